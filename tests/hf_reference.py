"""Tiny random transformers Qwen2.5-Omni models, built offline: the numerical reference of the parity tests.

Every parameter (norm weights and biases included) is perturbed away from its initial value so that a
mis-mapped tensor cannot hide behind an all-ones or all-zeros init.
"""

import copy
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration  # noqa: E402

# Token ids of the tiny configs (spec §11): AUDIO=1, IMAGE=2, VIDEO=3, audio bos/eos 4/5, vision bos/eos 7/8.
IDS = dict(audio_token_index=1, image_token_index=2, video_token_index=3, audio_start_token_id=4,
           audio_end_token_id=5, vision_start_token_id=7, vision_end_token_id=8)

_VISION = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=24, num_heads=4, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
_AUDIO = dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=32, encoder_layers=2, num_mel_bins=128,
              n_window=100, output_dim=32)

# Three text decoders: GQA 2 / 4 / 1 (MHA), different head dims and mrope sections.
TEXT_VARIANTS = {
    "gqa2": dict(vocab_size=200, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_parameters={"mrope_section": [1, 1, 2], "rope_type": "default",
                                                         "rope_theta": 1e6}),
    "gqa4": dict(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16,
                 rope_parameters={"mrope_section": [2, 3, 3], "rope_type": "default", "rope_theta": 1e4}),
    "mha": dict(vocab_size=128, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, head_dim=12, rms_norm_eps=1e-5,
                rope_parameters={"mrope_section": [2, 2, 2], "rope_type": "default", "rope_theta": 1e6}),
}


def thinker_config(variant: str = "gqa2", **overrides) -> Qwen2_5OmniThinkerConfig:
  text = dict(TEXT_VARIANTS[variant], tie_word_embeddings=False, pad_token_id=0)
  vision = dict(_VISION, out_hidden_size=text["hidden_size"])
  audio = dict(_AUDIO, output_dim=text["hidden_size"])
  kw = dict(vision_config=vision, audio_config=audio, text_config=text, user_token_id=6, **IDS)
  kw.update(overrides)
  return Qwen2_5OmniThinkerConfig(**copy.deepcopy(kw))


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model


def build_thinker(variant: str = "gqa2", seed: int = 0, **overrides):
  torch.manual_seed(seed)
  model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(variant, **overrides)).eval()
  return perturb(model, seed + 1)


def text_ids(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
  """Random ordinary text ids (>= 10, so no special/media id of the tiny configs)."""
  return rng.integers(10, vocab, size=(batch, length))


def converted(hf_model, directory, **config_updates):
  """(our config, graphdef, state with the model's weights) through the checkpoint converter.

  config_updates: dotted keys of our config to set before building (e.g. {"model.dtype": "bfloat16"}).
  """
  from omni_jax.convert import hf  # noqa: PLC0415 - keep this module importable before jax is configured
  from omni_jax.models import omni  # noqa: PLC0415

  hf_model.save_pretrained(directory)
  config = hf.config_from_hf(hf.read_config(directory))
  for key, value in config_updates.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  graphdef, abstract = omni.abstract_model(config)
  return config, graphdef, hf.load_state(str(directory), abstract)


def ours(hf_model, directory, **config_updates):
  """(our model with the transformers model's weights, our config)."""
  from flax import nnx  # noqa: PLC0415

  config, graphdef, state = converted(hf_model, directory, **config_updates)
  return nnx.merge(graphdef, state), config

