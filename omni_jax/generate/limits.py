"""What a model can take and emit: the context-length check every front door makes before prefilling, and the
ids a decode loop may choose.

  limit = context_limit(config)                 # text.max_position_embeddings, or a smaller fixed cache
  check_context(prompt_tokens, max_new_tokens, limit=limit)   # ContextLengthError when prompt + reply exceed it

The embedding tables are padded past the ids that mean something (the Thinker's 151,936 / 152,064 rows against
the tokenizer's 151,665 ids; the Talker's codec rows past its speech codes and special ids), and a model can
still put weight on those rows. The engine's decode loop gives them -inf logits (omni_jax.generate.engine's
vocab_limit and code_limit): for the Thinker every id at or past the tokenizer's size (the stop ids aside), for
the Talker every id its Token2Wav cannot embed, or without one every id past the codec's codes and special ids
(talker_code_limit), the stop ids that end a reply aside.
"""

from typing import Any, Optional


class ContextLengthError(ValueError):
  """A prompt plus its reply longer than the model (or a session's cache) takes. prompt_tokens: the whole
  prompt (chat markup and media placeholders included); max_new_tokens: the reply's budget (0 where none is
  counted yet, e.g. while a session's input arrives); limit: the most positions, prompt + reply."""

  def __init__(self, prompt_tokens: int, max_new_tokens: int, limit: int, *, subject: str = "this model",
               hint: Optional[str] = None):
    self.prompt_tokens, self.max_new_tokens, self.limit = int(prompt_tokens), int(max_new_tokens), int(limit)
    reply = f" and max_new_tokens {self.max_new_tokens}" if self.max_new_tokens else ""
    message = (f"the prompt is {self.prompt_tokens} tokens{reply}; {subject} takes at most {self.limit} positions "
               "(prompt + reply)")
    super().__init__(message + (f"; {hint}" if hint else ""))


def check_context(prompt_tokens: int, max_new_tokens: int, *, limit: Optional[int], subject: str = "this model",
                  hint: Optional[str] = None, error: type = ContextLengthError) -> None:
  """Raise ContextLengthError (or its subclass `error`) when prompt_tokens + max_new_tokens exceed limit
  (None: no limit). subject names what has the limit; hint: where it comes from, appended to the message."""
  if limit is not None and int(prompt_tokens) + int(max_new_tokens) > int(limit):
    raise error(prompt_tokens, max_new_tokens, limit, subject=subject, hint=hint)


def _get(node: Any, *path: str) -> Any:
  for key in path:
    if node is None:
      return None
    node = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
  return node


def context_limit(config, *, cache_len: Optional[int] = None) -> Optional[int]:
  """The most positions (prompt + reply) a model's Thinker takes: config.model.thinker.text
  .max_position_embeddings, or a smaller fixed cache: cache_len (a session's), else config.generate
  .max_cache_len (None: neither is set)."""
  fixed = cache_len if cache_len is not None else _get(config, "generate", "max_cache_len")
  limits = [_get(config, "model", "thinker", "text", "max_position_embeddings"), fixed]
  limits = [int(x) for x in limits if x]
  return min(limits) if limits else None


def talker_code_limit(config) -> Optional[int]:
  """The Talker chooses codes below this (and its stop ids, whatever their value). With a Token2Wav: what its
  code table embeds (config.model.token2wav.dit.num_embeds + 1 rows), so that every voiced code has a row.
  Without one: the codec's own ids, i.e. the speech codes (config.model.talker.num_codes) and the special ids
  above them (pad / bos / end / mask); the codec table's rows past those are padding. None: no Talker."""
  talker = _get(config, "model", "talker")
  if talker is None:
    return None
  from omni_jax.models.dit import DiTConfig  # noqa: PLC0415 - the released defaults, read only here
  from omni_jax.models.talker import TalkerConfig  # noqa: PLC0415

  def field(node, name, cls):
    value = _get(node, name)
    return int(getattr(cls, name) if value is None else value)

  dit = _get(config, "model", "token2wav", "dit")
  if dit is not None:
    return field(dit, "num_embeds", DiTConfig) + 1
  specials = [field(talker, f"tts_codec_{k}_token_id", TalkerConfig) for k in ("start", "end", "pad", "mask")]
  return max(field(talker, "num_codes", TalkerConfig), max(specials) + 1)
