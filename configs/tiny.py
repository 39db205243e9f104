"""Tiny Qwen2.5-Omni for CPU: builds in seconds; the README's main job and most tests use it.

  python train.py --config configs/tiny.py --workdir workdirs/tiny
"""

import ml_collections

from omni_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  c = defaults.base_config()
  t = c.model.thinker
  defaults.thinker_token_ids(t)
  t.text = ml_collections.ConfigDict(dict(
      vocab_size=151936, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6,
      mrope_section=(2, 3, 3), max_position_embeddings=4096, tie_word_embeddings=False))
  return c
