"""Defaults shared by every config in configs/: mesh, the logical-axis rule table, runtime options."""

import ml_collections

# The one logical -> mesh rule table (MaxText style). Weights: FSDP over `embed`, tensor parallel over
# heads / mlp / vocab. Activations: batch over data+fsdp, sequence over context.
SHARDING_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", ("context",)),
    ("activation_embed", ()),
    ("activation_heads", ("tensor",)),
    ("activation_kv_heads", ("tensor",)),
    ("activation_mlp", ("tensor",)),
    ("activation_vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("norm", ()),
    ("layers", ()),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
  c.sharding_rules = SHARDING_RULES
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # compute dtype ("bfloat16" for training at scale)
  c.model.param_dtype = "float32"  # master weights
  c.model.scan_layers = True
  c.model.remat_policy = "none"  # one of omni_jax.config.REMAT_POLICIES
  c.model.attention_impl = None  # None/"xla": XLA attention; "cudnn": cuDNN fused attention on GPU
  c.model.thinker = ml_collections.ConfigDict()
  return c


def thinker_token_ids(c: ml_collections.ConfigDict) -> None:
  """The released checkpoints' special ids (spec §1.4)."""
  c.audio_token_id = 151646
  c.image_token_id = 151655
  c.video_token_id = 151656
  c.audio_start_token_id = 151647
  c.audio_end_token_id = 151648
  c.vision_start_token_id = 151652
  c.vision_end_token_id = 151653
  c.position_id_per_seconds = 25
  c.seconds_per_chunk = 2
  c.spatial_merge_size = 2
