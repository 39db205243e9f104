"""Qwen2.5-Omni-7B: the released checkpoint's dimensions.

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
  # Audio encoder: the released encoder. freeze=True stops gradients at its output.
  t.audio = ml_collections.ConfigDict(dict(
      num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
      activation_function="gelu", max_source_positions=1500, n_window=100, output_dim=3584, freeze=False))
  # Vision encoder: the released 32-block ViT, merged tokens projected to the LM width (3584).
  # freeze=True stops gradients at its output.
  t.vision = ml_collections.ConfigDict(dict(
      depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
      temporal_patch_size=2, spatial_merge_size=2, window_size=112, out_hidden_size=3584,
      fullatt_block_indexes=(7, 15, 23, 31), hidden_act="silu", rope_theta=10000.0, freeze=False))
  # Talker: 24 layers of width 896, 12 heads x 128 / 4 KV heads, codec vocabulary 8448.
  defaults.talker(c, 3584, vocab_size=8448, hidden_size=896, intermediate_size=18944, num_hidden_layers=24,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=128)
  # Never [B, L, 151936] float32 logits: the head + cross-entropy run over 1024-position chunks.
  c.train.loss_chunk_size = 1024
  return c
