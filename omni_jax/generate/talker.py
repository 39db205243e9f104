"""The Talker's generation settings: how a spoken reply's codes are chosen and where they stop.

The codes themselves are decoded by the conversation engine (omni_jax.generate.engine) beside the Thinker's
text. Defaults: config.generate.talker over the released decoding (sampling, top-k 40, top-p 0.8, temperature
0.9, penalty 1.05, 4096 codes); the codec bos is never chosen, nor, the stop ids aside, any id at or past
code_limit (omni_jax.generate.limits.talker_code_limit).
"""

from typing import Optional, Sequence, Union

from omni_jax.generate import limits
from omni_jax.generate.sampling import SamplingParams
from omni_jax.models.talker import talker_config

# The released Talker decoding (transformers' Qwen2_5OmniForConditionalGeneration.generate talker_* defaults).
RELEASED = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05, max_new_tokens=4096,
                seed=0)


class TalkerSettings:
  """config.model.talker (cfg) and config.generate.talker (defaults) of a model with a Talker."""

  def __init__(self, config):
    self.cfg = talker_config(config)
    if self.cfg is None:
      raise ValueError("config.model.talker: this model has no Talker, so it cannot speak")
    generate = config.get("generate", None)
    talker = generate.get("talker", None) if generate is not None else None
    self.defaults = dict(RELEASED, **(dict(talker) if talker is not None else {}))
    self.code_limit = limits.talker_code_limit(config)

  def sampling(self, **overrides) -> SamplingParams:
    """config.generate.talker's rule with the given (non-None) overrides."""
    return SamplingParams.from_config(self.defaults, **overrides)

  @property
  def stop_ids(self) -> tuple[int, int]:
    """The codes that end a spoken reply: codec pad and codec end."""
    return (self.cfg.tts_codec_pad_token_id, self.cfg.tts_codec_end_token_id)

  def speaker_tokens(self, speaker: Union[None, str, Sequence[Optional[str]]], batch: int) -> list[int]:
    """The speaker token of each of `batch` rows: one name (None: default_speaker) or one per row."""
    names = [speaker] * batch if speaker is None or isinstance(speaker, str) else list(speaker)
    if len(names) != batch:
      raise ValueError(f"{len(names)} speakers for {batch} rows")
    return [self.cfg.speaker_token(n) for n in names]
