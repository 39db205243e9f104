"""Real-time latency of a spoken question: time to first text token, time to first audio chunk (both from the
end of the user's input) and the real-time factor of the speech that follows, for OmniSession and for
transformers' Qwen2_5OmniForConditionalGeneration.generate(return_audio=True) on the same weights and prompt.

  .venv/bin/python bench/bench_stream.py [--size tiny|100m] [--seconds 4] [--reply 16] [--codes 96] [--iters 3]

The model: a full Qwen2.5-Omni (Thinker with the audio tower, Talker, Token2Wav) with the real vocabulary and
token ids, random perturbed weights, saved by transformers (plus a spk_dict.pt voice) and loaded by
omni_jax.generate.load, so both sides run the same weights. The question: `--seconds` of noise-like audio.

ours: OmniSession pushes the audio in 0.5 s pieces (every complete 2 s is encoded and prefilled as it
  arrives); the clock starts before the last piece is pushed; respond(speak=True) then streams text, the
  Talker's codes (the Talker decodes beside the Thinker from the reply's first token: omni_jax.generate.engine)
  and 24 kHz audio from the streaming Token2Wav.
transformers: the whole input at once (features precomputed, not timed); generate returns text and audio at
  the end, so its first text and first audio are both the whole call.
Both decode greedily `--reply` text tokens and `--codes` speech codes (stops disabled: the same work on both
sides). RTF = seconds to produce the speech after the first chunk / its duration (ours: last audio event - first
audio event over the remaining audio; transformers: the whole call / the whole audio). Medians of --iters runs
after a warm-up (compilation excluded); the ratio is transformers / ours (> 1: we are earlier).
--batch N: throughput of batched sessions instead: N conversations (the same question) answered by one
respond_together call vs N respond() calls one after another (text + codes, no audio), as a ratio.
--no-reference: our side only, on our own config of the size (no transformers, no torch: what a TPU VM has)
with random weights drawn on the devices, the bundled Qwen tokenizer and one random voice; `--size 7b` is the
released model's shape (Thinker + audio tower, Talker, Token2Wav; no vision tower) for an accelerator
(`--dtype bfloat16`). Its Token2Wav has the released geometry (24-frame blocks) at SIZES' DiT dimensions.
Figures: docs/performance.md ("Streaming").
"""

import argparse
import copy
import os
import tempfile
import time

import jax
import numpy as np

import common  # noqa: F401  pylint: disable=unused-import  (puts the repository and tests/ on sys.path)

SIZES = {
    # Thinker text decoder, audio tower, Talker, Token2Wav DiT / BigVGAN; the Qwen vocabulary throughout.
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope=[2, 3, 3], tie=False),
        audio=dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=2),
        talker=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, mrope=[2, 3, 3]),
        dit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2,
                 look_ahead_layers=[1], look_backward_layers=[0]),
        bigvgan=dict(upsample_initial_channel=64)),
    # ~100 M parameters in all (78 M of them the tied 151,936 x 512 embedding).
    "100m": dict(
        text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, mrope=[8, 12, 12], tie=True),
        audio=dict(d_model=256, encoder_attention_heads=4, encoder_ffn_dim=1024, encoder_layers=4),
        talker=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=64, mrope=[8, 12, 12]),
        dit=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=32, ff_mult=2,
                 look_ahead_layers=[1], look_backward_layers=[0]),
        bigvgan=dict(upsample_initial_channel=128)),
    "7b": None,  # the released dimensions (configs/qwen2_5_omni_7b.py): --no-reference only
}
SPEAKER, SPEAKER_BOS = "Chelsie", 151872


def build_reference(size: str, seed: int = 0):
  """(transformers model with perturbed random weights, its saved directory with spk_dict.pt)."""
  import torch  # noqa: PLC0415
  from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration  # noqa: PLC0415

  import hf_reference as ref  # noqa: PLC0415

  s = SIZES[size]
  t = dict(s["text"])
  section, tie = t.pop("mrope"), t.pop("tie")
  rope = lambda sec: {"mrope_section": sec, "rope_type": "default", "rope_theta": 1e6}  # noqa: E731
  text = dict(t, vocab_size=151936, tie_word_embeddings=tie, rope_parameters=rope(section))
  thinker = dict(text_config=text, audio_config=dict(ref._AUDIO, **s["audio"], output_dim=t["hidden_size"]),  # noqa: SLF001
                 vision_config=dict(ref._VISION, out_hidden_size=t["hidden_size"]),  # noqa: SLF001
                 vision_start_token_id=151652, vision_end_token_id=151653)  # the released ids (not in its defaults)
  tk = dict(s["talker"])
  talker = dict(tk, rope_parameters=rope(tk.pop("mrope")), vocab_size=8448, embedding_size=t["hidden_size"],
                spatial_merge_size=2)
  talker.pop("mrope", None)
  t2w = copy.deepcopy(ref.TOKEN2WAV)
  t2w["dit_config"].update(s["dit"], num_embeds=8448)
  t2w["bigvgan_config"].update(s["bigvgan"])
  config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=t2w)
  torch.manual_seed(seed)
  model = ref.perturb(Qwen2_5OmniForConditionalGeneration(config).eval(), seed + 1)
  g = torch.Generator().manual_seed(seed + 2)
  enc = t2w["dit_config"]["enc_emb_dim"]
  model.speaker_map = {SPEAKER: {"bos_token": SPEAKER_BOS, "cond": torch.randn(enc, generator=g),
                                 "ref_mel": torch.randn(1, 48, 80, generator=g)}}
  directory = tempfile.mkdtemp()
  model.save_pretrained(directory)
  torch.save(model.speaker_map, os.path.join(directory, "spk_dict.pt"))
  return model, directory


def build_ours(size: str, dtype: str):
  """(OmniChat over our config of SIZES[size] with random weights, its parameter count): the Thinker with its
  audio tower, the Talker and Token2Wav, the bundled Qwen tokenizer, and a random voice for SPEAKER."""
  import ml_collections  # noqa: PLC0415
  from configs import qwen2_5_omni_7b  # noqa: PLC0415
  from omni_jax import sharding  # noqa: PLC0415
  from omni_jax.generate import Generator, OmniChat  # noqa: PLC0415
  from omni_jax.input.tokenizer import Tokenizer  # noqa: PLC0415
  from omni_jax.models import dit, omni  # noqa: PLC0415
  from omni_jax.token2wav import voice  # noqa: PLC0415

  c = qwen2_5_omni_7b.get_config()
  with c.unlocked():
    del c.model.thinker["vision"]  # a spoken question: the vision tower would only cost memory and set-up
  c.model.token2wav = ml_collections.ConfigDict(dict(dit=dit.config_dict(), bigvgan=ml_collections.ConfigDict(),
                                                     dtype=dtype))
  c.model.dtype = c.model.param_dtype = dtype
  c.model.thinker.eos_token_ids = ()  # every reply decodes --reply tokens
  if SIZES[size] is not None:
    s = SIZES[size]
    text, talker = dict(s["text"]), dict(s["talker"])
    mrope, tie = text.pop("mrope"), text.pop("tie")
    width = text["hidden_size"]
    c.model.thinker.text.update(text, head_dim=width // text["num_attention_heads"], mrope_section=tuple(mrope),
                                tie_word_embeddings=tie)
    c.model.thinker.audio.update(s["audio"], output_dim=width)
    c.model.talker.text.update(talker, mrope_section=tuple(talker.pop("mrope")))
    c.model.talker.embedding_size = width
    c.model.token2wav.dit.update(s["dit"])
    c.model.token2wav.bigvgan.update(s["bigvgan"])
  mesh = sharding.make_mesh({"data": -1})
  graphdef, state, shardings = omni.create_sharded(c, mesh)
  directory = tempfile.mkdtemp()  # the checkpoint directory a voice is read from
  rng = np.random.default_rng(2)
  ref_frames = 300 if size == "7b" else 48
  voice.write_voices(os.path.join(directory, voice.SPEAKERS_FILE),
                     {SPEAKER: (rng.standard_normal(c.model.token2wav.dit.enc_emb_dim),
                                rng.normal(-4.0, 2.0, (ref_frames, c.model.token2wav.dit.mel_dim)))})
  model = OmniChat(Generator(graphdef, state, c, mesh, shardings), Tokenizer(None), c, checkpoint_path=directory)
  model.set_voice_options(vocoder="bigvgan")  # "auto" keeps Griffin-Lim for a BigVGAN not converted from a release
  return model, sum(int(np.size(x)) for x in jax.tree.leaves(state))


def question(seconds: float) -> np.ndarray:
  """Noise shaped like speech: 4 Hz syllable envelope over band noise, 16 kHz."""
  rng = np.random.default_rng(0)
  n = int(seconds * 16000)
  t = np.arange(n) / 16000
  return (rng.standard_normal(n) * 0.1 * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def run_ours(model, wave, reply: int, codes: int, piece: int = 8000):
  from omni_jax.serve import OmniSession  # noqa: PLC0415

  s = OmniSession(model, speaker=SPEAKER)
  cut = (wave.shape[0] - 1) // piece * piece  # the last piece is pushed after the clock starts
  for start in range(0, cut, piece):
    s.push_audio(wave[start:start + piece])
  t0 = time.perf_counter()
  s.push_audio(wave[cut:], final=True)
  s.push_text("Answer the question.")
  s.end_turn()
  prompt = s.prompt_sample()  # the conversation up to the reply: transformers' input
  first = {}
  audio_s, last = 0.0, None
  for e in s.respond(speak=True, max_new_tokens=reply, do_sample=False,
                     talker=dict(max_new_tokens=codes, do_sample=False, repetition_penalty=1.05, stop_ids=())):
    first.setdefault(e.kind, e.t - t0)
    if e.kind == "audio":
      if "audio_len" not in first:
        first["audio_len"] = e.payload.shape[0] / 24000
      audio_s += e.payload.shape[0] / 24000
      last = e.t - t0
  rest = audio_s - first["audio_len"]
  rtf = (last - first["audio"]) / rest if rest > 0 else float("nan")
  return dict(text=first["text"], codes=first["codes"], audio=first["audio"], rtf=rtf, audio_s=audio_s,
              prompt=prompt)


def run_batch(model, wave, reply: int, codes: int, n: int) -> tuple[float, float]:
  """Seconds for n replies (text + codes) one after another, and in one respond_together call."""
  from omni_jax.serve import OmniSession  # noqa: PLC0415
  from omni_jax.serve.session import respond_together  # noqa: PLC0415

  def sessions():
    out = [OmniSession(model, speaker=SPEAKER, synthesizer=lambda: None) for _ in range(n)]
    for s in out:
      s.push_audio(wave, final=True)
      s.push_text("Answer the question.")
      s.end_turn()
    return out

  kw = dict(speak=True, max_new_tokens=reply, do_sample=False,
            talker=dict(max_new_tokens=codes, do_sample=False, repetition_penalty=1.05, stop_ids=()))
  alone = sessions()
  t0 = time.perf_counter()
  for s in alone:
    for _ in s.respond(**kw):
      pass
  one_by_one = time.perf_counter() - t0
  together = sessions()
  t0 = time.perf_counter()
  for _ in respond_together(together, **kw):
    pass
  return one_by_one, time.perf_counter() - t0


def run_theirs(model, prompt_ids, feats, reply: int, codes: int):
  import torch  # noqa: PLC0415

  ids = torch.tensor(prompt_ids[None].astype(np.int64))
  kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=torch.tensor(feats[None]),
            feature_attention_mask=torch.ones((1, feats.shape[1]), dtype=torch.long), speaker=SPEAKER,
            thinker_max_new_tokens=reply, thinker_min_new_tokens=reply, thinker_do_sample=False,
            talker_max_new_tokens=codes, talker_min_new_tokens=codes, talker_do_sample=False)
  t0 = time.perf_counter()
  with torch.no_grad():
    _, audio = model.generate(**kw)
  total = time.perf_counter() - t0
  seconds = audio.reshape(-1).shape[0] / 24000
  return dict(text=total, audio=total, rtf=total / seconds, audio_s=seconds)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", default="tiny", choices=sorted(SIZES))
  p.add_argument("--seconds", type=float, default=4.0, help="length of the spoken question")
  p.add_argument("--reply", type=int, default=16, help="Thinker reply tokens")
  p.add_argument("--codes", type=int, default=96, help="speech codes (50 per second of speech)")
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--no-reference", dest="reference", action="store_false")
  p.add_argument("--batch", type=int, default=0, help="measure batched sessions' throughput (N conversations)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="with --no-reference")
  args = p.parse_args()
  if args.reference and (SIZES[args.size] is None or args.dtype != "float32"):
    p.error("transformers' side runs the small sizes in float32; --size 7b and --dtype bfloat16 need --no-reference")
  if args.reference:
    import torch  # noqa: PLC0415

    from omni_jax import generate  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count())
    hf_model, directory = build_reference(args.size)
    model = generate.load(directory)
    n_params = sum(p.numel() for p in hf_model.parameters())
  else:
    hf_model, (model, n_params) = None, build_ours(args.size, args.dtype)
  platform = jax.devices()[0].platform.upper()
  wave = question(args.seconds)
  if args.batch:
    runs = [run_batch(model, wave, args.reply, args.codes, args.batch) for _ in range(args.iters + 1)][1:]
    alone, together = (float(np.median([r[i] for r in runs])) for i in (0, 1))
    print(f"size {args.size}, {args.batch} conversations x ({args.reply} tokens + {args.codes} codes), {platform}: "
          f"one after another {alone:.2f} s, batched {together:.2f} s: {alone / together:.2f}x the throughput",
          flush=True)
    return
  ours, theirs = [], []
  for i in range(args.iters + 1):  # run 0 compiles / warms up
    o = run_ours(model, wave, args.reply, args.codes)
    sample = o.pop("prompt")
    if i:
      ours.append(o)
    if args.reference:
      h = run_theirs(hf_model, sample.input_ids, sample.audios[0], args.reply, args.codes)
      if i:
        theirs.append(h)
  med = lambda rows, k: float(np.median([r[k] for r in rows]))  # noqa: E731
  line = (f"size {args.size} ({n_params / 1e6:.0f} M params), {args.seconds:g} s question, {args.reply} tokens, "
          f"{args.codes} codes ({med(ours, 'audio_s'):.2f} s of speech), {platform}: ours first text "
          f"{med(ours, 'text') * 1e3:.0f} ms, first code {med(ours, 'codes') * 1e3:.0f} ms, first audio "
          f"{med(ours, 'audio') * 1e3:.0f} ms, RTF "
          f"{med(ours, 'rtf'):.2f}")
  if theirs:
    line += (f" | transformers first text {med(theirs, 'text') * 1e3:.0f} ms, first audio "
             f"{med(theirs, 'audio') * 1e3:.0f} ms, RTF {med(theirs, 'rtf'):.2f} | first audio ratio "
             f"{med(theirs, 'audio') / med(ours, 'audio'):.1f}x earlier")
  print(line, flush=True)


if __name__ == "__main__":
  main()
