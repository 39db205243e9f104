"""Qwen2.5-Omni-7B: the released checkpoint's dimensions (spec §1).

Fine-tune from a converted checkpoint:
  python -m omni_jax.convert --hf_dir /path/to/Qwen2.5-Omni-7B --out_dir ckpt/omni7b --config configs/qwen2_5_omni_7b.py
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
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
      num_key_value_heads=4, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6,
      mrope_section=(16, 24, 24), max_position_embeddings=32768, tie_word_embeddings=False))
  return c
