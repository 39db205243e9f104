"""Talker speech-code decoding vs transformers' Talker generate on the same weights: codes/s (same run).

  .venv/bin/python bench/bench_talker.py [--size tiny|100m] [--batch 1 4] [--prompt 64] [--reply 16] [--new 64]
  .venv/bin/python bench/bench_talker.py --size 7b --no-reference --dtype bfloat16      # on a GPU

Both sides decode the same Thinker output (transformers' greedy reply to left-padded random prompts, its Talker
inputs built by Qwen2_5OmniForConditionalGeneration.generate, ours by omni_jax.talker.inputs), greedily with
the released repetition penalty and suppressed codec bos, without stop codes (every row runs --new codes).
Decode codes/s = rows * (new - 1) / (time(new) - time(1)): the prefill (ours: with its teacher-forced Thinker
forward) cancels out. The median over --iters interleaved rounds (after a warm-up: compilation excluded) of the
round's difference time(new) - time(1), which cancels the load of the moment on a shared machine; the ratio is
ours / transformers (> 1: we are faster). Real-time speech needs well over 50 codes/s per row at batch 1
(50 codes = 1 s of audio). --no-reference: our side only, on our own config of the size with random weights (no
transformers or torch); --size 7b is the released Talker shape and the 7B Thinker feeding it. Figures:
docs/performance.md ("Talker decode").

Ours is the teacher-forced Talker of tests/decode_oracle.py (the Talker alone on a given reply, as
transformers' talker.generate). The library speaks through the conversation engine, the Talker one text token
behind the Thinker in the same loop; with --no-reference the bench also measures that loop ("engine"): each row
speaks a --reply-token reply, and the codes/s are the difference of 2 x --reply and --new codes, which both
outlast the text, so the Thinker's work cancels out and what remains is the Talker's steps in the engine's
program after the text ended (where a spoken reply spends most of its codes). bench/bench_stream.py and
bench/bench_server.py measure the whole reply with its audio.
"""

import argparse
import copy
import os
import tempfile

import jax
import numpy as np

import common  # puts the repository and tests/ on sys.path; left_padded_prompts
import decode_oracle
import reply_testlib
from omni_jax import sharding
from omni_jax.convert import hf
from omni_jax.generate import Generator, SamplingParams
from omni_jax.generate import engine as engine_lib
from omni_jax.models import omni

THINKERS = {  # Thinker text decoders that feed the Talker (its width = the Talker's embedding_size)
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_parameters={"mrope_section": [2, 3, 3], "rope_type": "default",
                                                         "rope_theta": 1e6}),
    "100m": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, rope_parameters={"mrope_section": [8, 12, 12], "rope_type": "default",
                                                         "rope_theta": 1e6}),
}
TALKERS = {
    "tiny": dict(vocab_size=8448, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_parameters={"mrope_section": [2, 3, 3],
                                                                       "rope_type": "default", "rope_theta": 1e6}),
    # ~100 M parameters: the released layout (12 x 128 heads over a narrower width) at 12 layers.
    "100m": dict(vocab_size=8448, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                 rope_parameters={"mrope_section": [8, 12, 12], "rope_type": "default", "rope_theta": 1e6}),
}
CODEC = dict(tts_codec_start_token_id=8293, tts_codec_end_token_id=8294, tts_codec_pad_token_id=8292,
             tts_codec_mask_token_id=8296)


class _Captured(Exception):
  pass


def reference(size: str, prompts: dict, reply: int):
  """(transformers full model, the kwargs its generate hands talker.generate, the Thinker's reply, our config,
  its saved directory)."""
  import torch  # noqa: PLC0415
  from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration  # noqa: PLC0415

  import hf_reference as ref  # noqa: PLC0415  (torch: a run with --no-reference needs neither)

  torch.set_num_threads(os.cpu_count())
  vocab = THINKERS[size]["vocab_size"]
  width = THINKERS[size]["hidden_size"]
  thinker = ref.thinker_config("gqa2", text_config=dict(THINKERS[size], tie_word_embeddings=False, pad_token_id=0),
                               vision_config=dict(ref._VISION, out_hidden_size=width),  # noqa: SLF001
                               audio_config=dict(ref._AUDIO, output_dim=width)).to_dict()  # noqa: SLF001
  text_ids = dict(tts_text_start_token_id=vocab - 3, tts_text_end_token_id=vocab - 2, tts_text_pad_token_id=vocab - 1)
  talker = dict(TALKERS[size], embedding_size=THINKERS[size]["hidden_size"], spatial_merge_size=2, **CODEC,
                **text_ids, **ref.IDS)
  config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=copy.deepcopy(ref.TOKEN2WAV))
  torch.manual_seed(0)
  model = ref.perturb(Qwen2_5OmniForConditionalGeneration(config).eval(), 1)
  model.speaker_map = {"Chelsie": {"bos_token": vocab - 4}}
  captured = {}

  def capture(**kw):
    captured.update(kw)
    raise _Captured

  original, model.talker.generate = model.talker.generate, capture
  ids, mask = (torch.tensor(prompts[k].astype(np.int64)) for k in ("input_ids", "segment_ids"))
  try:
    with torch.no_grad():
      model.generate(input_ids=ids, attention_mask=mask, thinker_max_new_tokens=reply, thinker_do_sample=False,
                     thinker_min_new_tokens=reply, thinker_pad_token_id=0, thinker_eos_token_id=None)
  except _Captured:
    pass
  model.talker.generate = original
  directory = tempfile.mkdtemp()
  model.save_pretrained(directory)
  ours = hf.config_from_hf(hf.read_config(directory))
  ours.model.talker.speakers = {"Chelsie": vocab - 4}
  ours.model.thinker.eos_token_ids = ()
  return model, captured, ours, directory


def thinker_reply(model, prompts: dict, reply: int) -> np.ndarray:
  import torch  # noqa: PLC0415

  ids, mask = (torch.tensor(prompts[k].astype(np.int64)) for k in ("input_ids", "segment_ids"))
  with torch.no_grad():
    out = model.thinker.generate(input_ids=ids, attention_mask=mask, max_new_tokens=reply, min_new_tokens=reply,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
  return out[:, ids.shape[1]:].numpy().astype(np.int32)


def speech_generator(config, directory=None) -> Generator:
  mesh = sharding.make_mesh({"data": -1})
  if directory is None:  # random weights in place (no reference)
    graphdef, state, shardings = omni.create_sharded(config, mesh)
  else:
    graphdef, abstract = omni.abstract_model(config)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding_rules)
    state = jax.device_put(hf.load_state(directory, abstract), shardings)
  return Generator(graphdef, state, config, mesh, shardings)


def spoken_codes(speech: Generator, prompts: dict, reply: int, sampling: SamplingParams, most: int):
  """f(codes) -> a function speaking `reply`-token replies to `prompts` with `codes` (<= most) codes each through
  the conversation engine (OmniChat's path: each prompt prefilled, the replies decoded together in the slots of
  one engine, whose programs every code count shares)."""
  chat = reply_testlib.chat(speech, eos_token_ids=())
  samples = [reply_testlib.text_sample(ids[seg > 0]) for ids, seg in zip(prompts["input_ids"], prompts["segment_ids"])]
  speaker = next(iter(speech.config.model.talker.speakers.values()))
  engine = chat.engine(speech=True, max_len=prompts["input_ids"].shape[1] + reply + 32, slots=len(samples),
                       max_new_tokens=reply, max_codes=most)

  def speak(codes: int):
    def run():
      out = [engine_lib.Reply(chat.prefilled(engine, s), engine_lib.ReplySettings(
          reply, speak=True, speaker=speaker, max_codes=codes, talker_sampling=sampling), keep=False)
          for s in samples]
      for _ in engine.run(out):
        pass
      assert all(len(r.codes) == codes for r in out), [len(r.codes) for r in out]
      return [r.codes for r in out]
    return run
  return speak


def our_config(size: str, dtype: str):
  """Our config of the released Talker and the 7B Thinker feeding it (tiny / 100m: THINKERS' and TALKERS' widths
  and depths over the released vocabularies and ids), for random weights: no transformers, no torch."""
  from configs import qwen2_5_omni_7b  # noqa: PLC0415

  c = qwen2_5_omni_7b.get_config()
  with c.unlocked():
    for k in ("audio", "vision"):
      if k in c.model.thinker:
        del c.model.thinker[k]
  if size != "7b":
    for section, spec in ((c.model.thinker.text, THINKERS[size]), (c.model.talker.text, TALKERS[size])):
      spec = {k: v for k, v in spec.items() if k != "vocab_size"}
      rope = spec.pop("rope_parameters")
      section.update(spec, mrope_section=tuple(rope["mrope_section"]), rope_theta=rope["rope_theta"],
                     head_dim=spec.get("head_dim", spec["hidden_size"] // spec["num_attention_heads"]))
    c.model.talker.embedding_size = THINKERS[size]["hidden_size"]
  c.model.dtype = c.model.param_dtype = dtype
  c.model.talker.speakers = {"Chelsie": 151872}
  c.model.thinker.eos_token_ids = ()
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny", choices=["tiny", "100m", "7b"])
  p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
  p.add_argument("--prompt", type=int, default=64)
  p.add_argument("--reply", type=int, default=16, help="Thinker reply tokens the Talker speaks")
  p.add_argument("--new", type=int, default=64, help="speech codes per row")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--no-reference", dest="reference", action="store_false")
  args = p.parse_args()
  if args.size == "7b" and args.reference:
    p.error("--size 7b runs our side only (add --no-reference): transformers' side runs tiny and 100m")
  if not args.reference and args.new <= 2 * args.reply:
    p.error(f"--new must exceed 2 x --reply ({2 * args.reply}): the engine's codes/s is the difference of the two")
  from common import median_difference, timings_alternating  # noqa: PLC0415

  greedy = SamplingParams(repetition_penalty=1.05)
  speech = None
  for rows in args.batch:
    vocab = THINKERS[args.size]["vocab_size"] if args.reference else 152064  # ours: the released vocabulary
    prompts = common.left_padded_prompts(rows, args.prompt, 10, vocab - 8)
    if args.reference:
      import torch  # noqa: PLC0415

      import hf_reference as ref  # noqa: PLC0415

      model, kwargs, config, directory = reference(args.size, prompts, args.reply)
      ref.keep_talker_mask(model.talker)  # batch 1: transformers would drop the mask and the codec rows
      config.model.dtype = config.model.param_dtype = args.dtype
      speech = speech_generator(config, directory)
      reply = thinker_reply(model, prompts, args.reply)
    else:
      speech = speech or speech_generator(our_config(args.size, args.dtype))
      reply = np.random.default_rng(1).integers(10, vocab - 8, size=(rows, args.reply)).astype(np.int32)
    n_params = sum(np.size(x) for path, x in jax.tree_util.tree_leaves_with_path(speech.params)
                   if "talker" in jax.tree_util.keystr(path))

    def ours(n):
      return lambda: decode_oracle.speech_codes(speech, prompts, reply, max_new_tokens=n, sampling=greedy,
                                                stop_ids=()).codes

    if not args.reference:
      t1, tn = timings_alternating([ours(1), ours(args.new)], args.iters)
      decode = median_difference(tn, t1)
      print(f"size {args.size} (Talker {n_params / 1e6:.1f} M params), {args.dtype}, {jax.devices()[0].platform}, "
            f"batch {rows}: ours {rows * (args.new - 1) / decode:.1f} codes/s "
            f"({(args.new - 1) / decode:.1f} per row; first code {np.median(t1) * 1e3:.1f} ms)", flush=True)
      short = 2 * args.reply
      engine_codes = spoken_codes(speech, prompts, args.reply, greedy, args.new)
      t_short, t_long = timings_alternating([engine_codes(short), engine_codes(args.new)], args.iters)
      decode = median_difference(t_long, t_short)
      print(f"batch {rows}: engine {rows * (args.new - short) / decode:.1f} codes/s "
            f"({(args.new - short) / decode:.1f} per row, the Talker's steps after the text)", flush=True)
      continue

    def theirs(n):
      def run():
        kw = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}  # its prefill edits embeds
        kw.update(max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.05,
                  eos_token_id=None, pad_token_id=CODEC["tts_codec_pad_token_id"])
        with torch.no_grad():
          return model.talker.generate(**kw)[:, kwargs["input_ids"].shape[1]:].numpy()
      return run

    t1, tn, h1, hn = timings_alternating([ours(1), ours(args.new), theirs(1), theirs(args.new)], args.iters)
    ours_cps = rows * (args.new - 1) / median_difference(tn, t1)
    hf_cps = rows * (args.new - 1) / median_difference(hn, h1)
    same = np.array_equal(ours(args.new)(), theirs(args.new)()) if args.dtype == "float32" else "n/a (bf16)"
    print(f"size {args.size} (Talker {n_params / 1e6:.1f} M params), {args.dtype}, batch {rows}: ours "
          f"{ours_cps:.1f} codes/s | transformers {hf_cps:.1f} codes/s | ratio {ours_cps / hf_cps:.2f}x | "
          f"same codes: {same}", flush=True)


if __name__ == "__main__":
  main()
