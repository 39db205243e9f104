"""A reply's decoding settings from the keyword arguments callers take (OmniChat, OmniSession, the server):
the one place that reads them, fills in config.generate's defaults and refuses unknown keys."""

from typing import Any, Mapping, Optional

from omni_jax.generate.engine import ReplySettings

SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
TALKER_KEYS = SAMPLING_KEYS + ("max_new_tokens", "seed", "stop_ids")


def reply_settings(generator, options: Mapping[str, Any], *, talker=None, talker_options: Optional[Mapping] = None,
                   max_codes: Optional[int] = None, speaker: int = 0, prefix: str = "") -> ReplySettings:
  """options: max_new_tokens, seed and the sampling keys (defaults: config.generate, generator.defaults). With a
  Talker (talker: omni_jax.generate.talker.TalkerSettings) the reply is spoken: talker_options are the same keys
  for the codes (defaults: config.generate.talker, the released decoding) and stop_ids (() runs to the code
  budget); max_codes: the most codes a reply may ask for (default: no bound but the Talker's default budget).
  Unknown keys raise TypeError (named with `prefix` for the Talker's, e.g. "talker_"); bad values ValueError."""
  options = dict(options)
  unknown = set(options) - set(SAMPLING_KEYS) - {"max_new_tokens", "seed"}
  if unknown:
    raise TypeError(f"unknown generation arguments {sorted(unknown)}")
  d = generator.defaults
  n_new = int(d.get("max_new_tokens", 256) if options.get("max_new_tokens") is None else options["max_new_tokens"])
  if n_new < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {n_new}")
  seed = int(d.get("seed", 0) if options.get("seed") is None else options["seed"])
  sampling = generator.sampling(**{k: options[k] for k in SAMPLING_KEYS if k in options})
  if talker is None:
    return ReplySettings(max_new_tokens=n_new, sampling=sampling, seed=seed)
  t = dict(talker_options or {})
  unknown = set(t) - set(TALKER_KEYS)
  if unknown:
    raise TypeError(f"unknown talker generation arguments {sorted(prefix + k for k in unknown)}")
  budget = int(max_codes if max_codes is not None else talker.defaults["max_new_tokens"])
  codes = int(budget if t.get("max_new_tokens") is None else t["max_new_tokens"])
  if not 1 <= codes <= budget:
    raise ValueError(f"talker max_new_tokens must be in [1, {budget}], got {codes}")
  return ReplySettings(
      max_new_tokens=n_new, sampling=sampling, seed=seed, speak=True, speaker=int(speaker), max_codes=codes,
      talker_sampling=talker.sampling(**{k: t[k] for k in SAMPLING_KEYS if k in t}),
      talker_seed=int(talker.defaults.get("seed", 0) if t.get("seed") is None else t["seed"]),
      stop=tuple(int(i) for i in t.get("stop_ids", talker.stop_ids)))
