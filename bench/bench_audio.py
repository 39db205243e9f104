"""Audio encoder throughput on CPU: seconds of audio encoded per second, omni_jax (jit) vs transformers.

Both sides run the same weights (transformers' random init, converted with omni_jax.convert.hf's table) on
the same batch of mixed-length audios, float32. Configs: the tiny test encoder and a 2-layer slice of the
7B encoder (d_model 1280, 20 heads, ffn 5120, output 3584).

  .venv/bin/python bench/bench_audio.py [--seconds 120] [--repeats 3]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from omni_jax.config import Runtime
from omni_jax.convert import hf
from omni_jax.input.media import audio as features
from omni_jax.models.audio import AudioConfig, AudioEncoder

CONFIGS = {
    "tiny": AudioConfig(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32, output_dim=64),
    "7b-2layers": AudioConfig(encoder_layers=2),
}


def _transformers_encoder(cfg: AudioConfig):
  from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
  from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

  hf_cfg = Qwen2_5OmniAudioEncoderConfig(**{k: getattr(cfg, k) for k in hf._AUDIO_KEYS})
  hf_cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  return Qwen2_5OmniAudioEncoder(hf_cfg).eval()


def _ours_from(model, cfg: AudioConfig) -> AudioEncoder:
  """Our encoder holding the transformers module's weights (through the checkpoint mapping table)."""
  tensors = {"thinker.audio_tower." + k: v.numpy() for k, v in model.state_dict().items()}
  graphdef, state = nnx.split(nnx.eval_shape(lambda: AudioEncoder(cfg, Runtime(), rngs=nnx.Rngs(0))))
  leaves = []
  for path, var in nnx.to_flat_state(state):
    dotted = "thinker.audio_tower." + ".".join(map(str, path))
    stacked = dotted.startswith("thinker.audio_tower.layers.")
    keys, rule = hf.disk_keys(dotted, var.get_value().shape[0] if stacked else 0)
    values = [rule.from_disk(tensors[k]) for k in keys]
    leaves.append((path, var.replace(jnp.asarray(np.stack(values) if stacked else values[0]))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _batch(total_seconds: float, rng: np.random.Generator):
  """Mixed-length audios (3..30 s) adding up to about total_seconds, as encoder input features."""
  lengths = []
  while sum(lengths) < total_seconds * 100:
    lengths.append(int(rng.integers(300, 3001)))
  feats = [rng.standard_normal((128, n)).astype(np.float32) for n in lengths]
  return feats, np.asarray(lengths)


def _time(fn, repeats: int) -> float:
  fn()  # warm-up (compilation for jax)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=120.0, help="audio per batch")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, jax {jax.__version__}, "
        f"backend {jax.default_backend()}")
  feats, lengths = _batch(args.seconds, np.random.default_rng(0))
  audio_seconds = lengths.sum() / 100
  buffer, lens = features.pad_batch(feats)
  cat = torch.from_numpy(np.concatenate(feats, axis=1))
  print(f"batch: {len(feats)} audios, {audio_seconds:.1f} s, padded buffer {buffer.shape}, "
        f"{features.chunk_count(lens)} chunks")
  for name, cfg in CONFIGS.items():
    theirs = _transformers_encoder(cfg)
    ours = _ours_from(theirs, cfg)
    graphdef, state = nnx.split(ours)
    encode = jax.jit(lambda s, x, n: nnx.merge(graphdef, s)(x, n, max_chunks=features.chunk_count(lens)))
    x, n = jnp.asarray(buffer), jnp.asarray(lens)

    def run_ours():
      jax.block_until_ready(encode(state, x, n))

    def run_theirs():
      with torch.no_grad():
        theirs(cat, feature_lens=torch.from_numpy(lengths))

    with torch.no_grad():
      expected = theirs(cat, feature_lens=torch.from_numpy(lengths)).last_hidden_state.numpy()
    got, count = encode(state, x, n)
    err = np.abs(np.asarray(got)[:int(count)] - expected).max()
    t_ours, t_theirs = _time(run_ours, args.repeats), _time(run_theirs, args.repeats)
    print(f"{name:>11}: omni_jax {audio_seconds / t_ours:9.1f} s/s ({t_ours * 1e3:7.1f} ms)  transformers "
          f"{audio_seconds / t_theirs:9.1f} s/s ({t_theirs * 1e3:7.1f} ms)  ratio {t_theirs / t_ours:5.2f}x  "
          f"(max abs diff {err:.1e})")


if __name__ == "__main__":
  main()
