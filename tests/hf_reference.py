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

from tiny_shapes import _AUDIO, _VISION, IDS, SPEAKERS, TALKER, TEXT_VARIANTS, TOKEN2WAV  # noqa: E402,F401


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
  # Parity is checked on the dense attention path, named here: the default ("auto") picks by platform and size.
  config.model.attention_impl = "xla"
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


def build_omni(seed: int = 0, eos_token_id=None, **talker):
  """The full tiny model (Thinker "gqa2" + Talker + Token2Wav), perturbed, with a speaker table; eos_token_id:
  the Thinker's stop ids (its generation_config), so that batched rows stop at different steps."""
  from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration  # noqa: PLC0415

  thinker = thinker_config("gqa2").to_dict()
  config = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=copy.deepcopy(dict(TALKER, **talker)),
                             token2wav_config=copy.deepcopy(TOKEN2WAV))
  torch.manual_seed(seed)
  model = perturb(Qwen2_5OmniForConditionalGeneration(config).eval(), seed + 1)
  g = torch.Generator().manual_seed(seed + 2)
  model.speaker_map = {name: {"bos_token": bos, "cond": torch.randn(8, generator=g),
                              "ref_mel": torch.randn(1, 12, 80, generator=g)} for name, bos in SPEAKERS.items()}
  if eos_token_id is not None:
    model.thinker.generation_config.eos_token_id = eos_token_id
  return model


class _TalkerDone(Exception):
  pass


def keep_talker_mask(talker):
  """Make transformers' Talker see its attention mask in generate; returns the hook handle (.remove()).

  transformers 5.24's generate drops an all-ones attention mask (generation/utils.py: `attention_mask == 1`
  .all() -> None), i.e. whenever no row is padded (always at batch 1). The Talker's forward keys its prefill on
  the mask: without it, it neither adds the codec pad / bos embeddings to the last two prefill rows nor computes
  TMRoPE positions, so batch-1 speech differs from the same row in a padded batch. The hook puts an
  all-ones mask back, so the reference builds the sequence its own pipeline intends.
  """

  def hook(module, args, kwargs):
    if kwargs.get("attention_mask") is None:
      x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
      cache = kwargs.get("cache", kwargs.get("past_key_values"))
      past = cache.get_seq_length() if cache is not None else 0
      kwargs["attention_mask"] = torch.ones((x.shape[0], past + x.shape[1]), dtype=torch.long)
    return args, kwargs

  return talker.register_forward_pre_hook(hook, with_kwargs=True)


def hf_speech(model, input_ids, attention_mask, *, thinker_max_new_tokens: int, talker_max_new_tokens: int,
              talker_eos_token_id, speaker: str = "Chelsie", **kw) -> dict:
  """transformers' full greedy pipeline up to the Talker (Token2Wav is not run): thinker sequences, the
  Talker's prefill inputs_embeds (before its codec half is added), its text-track queue, generated codes and
  raw per-step logits."""
  captured = {}
  original, thinker_generate = model.talker.generate, model.thinker.generate

  def thinker_hook(**kwargs):
    out = thinker_generate(**kwargs)
    captured["thinker_tokens"] = out.sequences[:, input_ids.shape[1]:].numpy()
    return out

  def hook(**kwargs):
    captured.update(inputs_embeds=kwargs["inputs_embeds"].clone(), queue=kwargs["thinker_reply_part"].clone(),
                    input_ids=kwargs["input_ids"].clone())
    out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
    captured.update(sequences=out.sequences, logits=torch.stack(out.logits, dim=1))
    raise _TalkerDone

  model.talker.generate, model.thinker.generate = hook, thinker_hook
  mask_hook = keep_talker_mask(model.talker)
  try:
    with torch.no_grad():
      model.generate(input_ids=input_ids, attention_mask=attention_mask, speaker=speaker,
                     thinker_max_new_tokens=thinker_max_new_tokens, thinker_do_sample=False,
                     talker_max_new_tokens=talker_max_new_tokens, talker_do_sample=False,
                     talker_eos_token_id=list(talker_eos_token_id), **kw)
  except _TalkerDone:
    pass
  finally:
    model.talker.generate, model.thinker.generate = original, thinker_generate
    mask_hook.remove()
  prompt_len = captured["input_ids"].shape[1]
  captured["codes"] = captured["sequences"][:, prompt_len:].numpy()
  return captured
