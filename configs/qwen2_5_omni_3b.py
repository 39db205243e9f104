"""Qwen2.5-Omni-3B: the released checkpoint's dimensions.

Thinker LM as in the 3B config.json (hidden 2048, 36 layers, 16 heads / 2 KV heads, vocab 151936); the
conversion checks every shape against the checkpoint, so a wrong value here fails loudly.
  python -m omni_jax.convert --hf_dir /path/to/Qwen2.5-Omni-3B --out_dir ckpt/omni3b --config configs/qwen2_5_omni_3b.py
"""

import ml_collections

from omni_jax import defaults


def get_config() -> ml_collections.ConfigDict:
  c = defaults.base_config()
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.mesh.data, c.mesh.fsdp = 1, -1
  t = c.model.thinker
  defaults.thinker_token_ids(t)
  t.text = ml_collections.ConfigDict(dict(
      vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
      num_key_value_heads=2, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6,
      mrope_section=(16, 24, 24), max_position_embeddings=32768, tie_word_embeddings=False))
  return c
