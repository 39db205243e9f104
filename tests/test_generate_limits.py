"""What generation may emit and take (omni_jax.generate.limits): padded vocabulary rows are never generated,
undecodable ids never raise, and a prompt too long for the model is refused before it is prefilled.

A tiny model (with a Talker) whose LM head and codec head favour their padding rows: the Thinker's columns past
the tokenizer's size and the Talker's columns past its codes and special ids are scaled up, so an unmasked
decode loop picks them at every step. Its positions are cut to 512, so long prompts are cheap.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile

import decode_oracle as oracle
import xla_env
from configs import tiny
from omni_jax import checkpoint
from omni_jax import generate
from omni_jax import sharding
from omni_jax.generate import limits
from omni_jax.generate import prompts
from omni_jax.input import tokenizer as tok_lib
from omni_jax.input.tokenizer import Tokenizer
from omni_jax.models import omni
from omni_jax.serve import OmniSession
from omni_jax.serve.session import SessionContextLengthError, SessionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIONS = 512
GAIN = 200.0  # the padding columns' scale: far above every real row's logit
GREEDY = dict(max_new_tokens=4, do_sample=False)
SAMPLED = dict(max_new_tokens=4, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt"))
  c = tiny.get_config()
  c.mesh = {"data": 1}
  c.model.thinker.text.max_position_embeddings = POSITIONS
  c.generate.max_new_tokens = 16
  c.generate.talker.max_new_tokens = 6
  _, state, _ = omni.create_sharded(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=7)
  real = Tokenizer(c.data.tokenizer).vocab_size
  head = state["thinker"]["lm_head"]["kernel"]
  head.value = head.value.at[:, real:].multiply(GAIN)
  codec = state["talker"]["codec_head"]["kernel"]
  codec.value = codec.value.at[:, limits.talker_code_limit(c):].multiply(GAIN)
  checkpoint.save_params(path, state, c)
  return path


@pytest.fixture(scope="module")
def model(ckpt):
  return generate.load(ckpt)


def _rendered(model, text: str) -> int:
  """The tokens OmniChat renders for a one-turn conversation (system turn and assistant header included)."""
  return prompts.prompt_sample(prompts.conversation(text), model.preprocessor).num_tokens


def test_tokenizer_decode_never_raises(caplog, tmp_path):
  tok = Tokenizer()
  assert tok.vocab_size == 151665
  hello = tok.decode(tok.encode("Hello"))
  with caplog.at_level(logging.WARNING, logger=tok_lib.__name__):
    assert tok.decode(tok.encode("Hello") + [151823, -1, 10 ** 12, 151700]) == hello
    assert tok.decode([151823]) == ""
  assert sum("has no id" in r.getMessage() for r in caplog.records) == 1  # once per tokenizer
  # The `tokenizers` backend: a model directory whose regular tokens are placeholders.
  (tmp_path / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(tok_lib.NUM_RANKS)}))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n")
  hf = Tokenizer(str(tmp_path))
  assert hf.vocab_size == 151665
  assert hf.decode([151644, 151823, -5, 151645]) == "<|im_start|><|im_end|>"

  class Gappy:  # a backend that rejects an id inside its range
    size = 10

    def decode(self, ids):
      if 3 in ids:
        raise KeyError(3)
      return "".join(chr(97 + i) for i in ids)

  tok._backend = Gappy()
  tok.special = {"x": 5}
  assert tok.decode([0, 3, 1, 99]) == "ab"


def reply_ids(model, conversations, settings) -> list[list[int]]:
  """The token ids of chat_batch's replies (what it decodes to text)."""
  return [r.tokens for r in model._decode_all(conversations, dict(settings))]  # noqa: SLF001


def test_padded_rows_win_without_the_mask(model):
  """The fixture's bias works: the prompt's last logits favour a padding row, which the reply never takes."""
  engine = model.engine(max_len=64, max_new_tokens=4)
  sample = prompts.prompt_sample(prompts.conversation("Hello"), model.preprocessor)
  assert int(np.argmax(model.prefilled(engine, sample).logits[0])) >= model.tokenizer.vocab_size
  assert reply_ids(model, [prompts.conversation("Hello")], GREEDY)[0][0] < model.tokenizer.vocab_size


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_chat_never_emits_padded_rows(model, settings):
  vocab = model.tokenizer.vocab_size
  assert model.generator.vocab_limit == vocab
  conversations = [prompts.conversation("Hello"), prompts.conversation("Say something else, please.")]
  assert all(max(ids) < vocab for ids in reply_ids(model, conversations, settings))
  reply = model.chat("Hello", **settings)
  assert "".join(model.stream_chat("Hello", **settings)) == reply
  assert model.chat_batch(conversations, **settings)[0] == reply


def test_speech_codes_stay_in_the_codec_range(model):
  t, limit = model.speech.cfg, model.speech.code_limit
  assert limit == t.tts_codec_mask_token_id + 1 < t.text.vocab_size  # the tiny codec: 64 codes, then 4 specials
  config = tiny.get_config()
  tiny.token2wav(config)  # a Token2Wav over the 64 codes: its table (65 rows) bounds them
  assert limits.talker_code_limit(config) == config.model.token2wav.dit.num_embeds + 1 == 65
  speech = model.speak("Hello", talker_max_new_tokens=6, **GREEDY)  # the codes: the released sampling
  assert len(speech.codes) and (np.asarray(speech.codes) < limit).all()
  # The bias works on the Talker too: an unmasked loop would speak a padding row (the oracle's raw logits).
  batch = model.batch([prompts.conversation("Hello")])
  text = oracle.generate(model.generator, batch, max_new_tokens=4, sampling=model.generator.sampling(do_sample=False))
  out = oracle.speech_codes(model.generator, batch, text.tokens, max_new_tokens=6, stop_ids=(), seed=1,
                            return_logits=True)
  assert (out.codes < limit).all()
  assert int(np.argmax(out.logits[0, 0])) >= limit


@pytest.mark.parametrize("speak,settings", [(False, GREEDY), (False, SAMPLED), (True, SAMPLED)],
                         ids=["text-greedy", "text-sampled", "spoken-sampled"])
def test_session_replies_never_emit_padded_rows(model, speak, settings):
  s = OmniSession(model)
  s.push_text("Hello")
  events = list(s.respond(speak=speak, talker=dict(max_new_tokens=6) if speak else None, **settings))
  done = events[-1].payload
  assert (np.asarray(done.tokens) < model.tokenizer.vocab_size).all()
  if speak:  # the Talker's released sampling
    assert len(done.codes) and (np.asarray(done.codes) < model.speech.code_limit).all()
  s.close()


def test_chat_refuses_a_prompt_past_the_positions(model):
  text = "word " * 600
  n = _rendered(model, text)
  assert n > POSITIONS
  for call in (lambda: model.chat(text, max_new_tokens=8), lambda: list(model.stream_chat(text, max_new_tokens=8)),
               lambda: model.speak(text, max_new_tokens=8),
               lambda: model.chat_batch([prompts.conversation("Hi"), prompts.conversation(text)], max_new_tokens=8),
               lambda: model.speak_batch([prompts.conversation(text)], max_new_tokens=8)):
    with pytest.raises(limits.ContextLengthError) as e:
      call()
    assert (e.value.prompt_tokens, e.value.max_new_tokens, e.value.limit) == (n, 8, POSITIONS)
    assert str(e.value) == (f"the prompt is {n} tokens and max_new_tokens 8; this model takes at most "
                            f"{POSITIONS} positions (prompt + reply)")
  # A prompt that fits, with a reply that does not; the default reply budget (config.generate) counts too.
  short = "word " * 200
  m = _rendered(model, short)
  with pytest.raises(limits.ContextLengthError, match=f"the prompt is {m} tokens and max_new_tokens 400;"):
    model.chat(short, max_new_tokens=400)
  assert limits.context_limit(model.config) == POSITIONS
  assert limits.context_limit(model.config, cache_len=300) == 300


def test_session_refuses_a_push_or_reply_past_its_context(model, tmp_path):
  s = OmniSession(model, max_len=4096)
  assert s.context_limit == POSITIONS
  text = "word " * 600
  with pytest.raises(SessionContextLengthError) as e:
    s.push_text(text)
  assert isinstance(e.value, limits.ContextLengthError) and isinstance(e.value, SessionError)
  assert (e.value.prompt_tokens, e.value.limit) == (_rendered(model, text), POSITIONS)
  assert "max_len=4096" in str(e.value) and s.num_tokens == 0  # nothing was prefilled
  # A message counts whole: an audio part and a text that each fit, together too long.
  wave = (np.random.default_rng(0).standard_normal(64000) * 0.1).astype(np.float32)  # 4 s: 100 tokens
  path = str(tmp_path / "noise.wav")
  soundfile.write(path, wave, 16000, subtype="FLOAT")
  words = "word " * 430
  message = {"role": "user", "content": [{"type": "audio", "path": path}, {"type": "text", "text": words}]}
  expected = prompts.prompt_sample([message], model.preprocessor).num_tokens
  with pytest.raises(SessionContextLengthError) as e:
    s.push_message({"role": "user", "content": [{"type": "audio", "array": wave, "sample_rate": 16000},
                                                {"type": "text", "text": words}]})
  assert e.value.prompt_tokens == expected > POSITIONS and s.num_tokens == 0
  # A reply too long for what is in: refused before the turn is closed; a shorter one then runs.
  s.push_text("Hello")
  before = s.num_tokens
  with pytest.raises(SessionContextLengthError) as e:
    list(s.respond(max_new_tokens=POSITIONS))
  assert (e.value.prompt_tokens, e.value.max_new_tokens) == (_rendered(model, "Hello"), POSITIONS)
  assert s.num_tokens == before
  done = list(s.respond(**GREEDY))[-1].payload
  assert done.prompt_tokens == _rendered(model, "Hello")
  s.close()


def test_generate_py_refuses_a_long_prompt_in_bounded_memory(ckpt):
  """generate.py with a 100,000-character prompt: exit status 2, one `error:` line, and a peak resident size
  no larger than a short prompt's run (nothing sized by the prompt is allocated before the check)."""
  env = xla_env.env(1, JAX_PLATFORMS="cpu")
  words = np.random.default_rng(0).choice(["lorem", "ipsum", "dolor", "sit", "amet,", "consectetur"], 20000)
  prompt = " ".join(words)[:100_000]
  # The child's peak RSS, read in an intermediate process whose only child it is.
  probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(r.stderr); sys.stdout.write(r.stdout); "
           "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
  out = subprocess.run([sys.executable, "-c", probe, sys.executable, "generate.py", "--checkpoint", ckpt,
                        "--prompt", prompt, "--max_new_tokens", "8", "--greedy"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr[-2000:]
  assert "max_new_tokens 8; this model takes at most 512 positions (prompt + reply)" in errors[0]
  peak_gb = int(out.stdout.split("peak_kb")[-1]) / 2 ** 20
  assert peak_gb < 1.5, f"peak resident size {peak_gb:.2f} GB"
