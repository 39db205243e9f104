"""The library's replies to rendered prompts, for tests on the tiny transformers reference models.

OmniChat needs a tokenizer that agrees with the model's special ids, which the reference models (hf_reference)
do not have; `Chat` is OmniChat's own engine() and prefilled() over a Generator without one, so these tests
decode through exactly what chat(), speak() and the sessions use: each prompt prefilled alone into a
conversation, the replies decoded together in the conversation engine's slots.
"""

import copy
import dataclasses
import types
from typing import Optional, Sequence

import numpy as np

from omni_jax.generate import api
from omni_jax.generate import engine as engine_lib
from omni_jax.generate import prompts
from omni_jax.generate.sampling import SamplingParams
from omni_jax.input import preprocess


class Chat(types.SimpleNamespace):
  engine = api.OmniChat.engine
  prefilled = api.OmniChat.prefilled


def chat(generator, eos_token_ids: Optional[Sequence[int]] = None) -> Chat:
  """OmniChat's engine path over `generator` (eos_token_ids: the ids that end a reply, default the config's)."""
  if eos_token_ids is not None:
    generator = copy.copy(generator)
    generator.ids = dataclasses.replace(generator.ids, eos_token_ids=tuple(int(i) for i in eos_token_ids))
  return Chat(generator=generator, config=generator.config, num_mel_bins=128, _engines={})


def text_sample(ids) -> preprocess.Sample:
  """A rendered text-only prompt of these ids (no chat markup added)."""
  ids = np.asarray(ids, np.int32)
  return preprocess.Sample("prompt", 0, ids, np.full_like(ids, -100), [], [], [], False)


def replies(chat: Chat, samples: Sequence[preprocess.Sample], *, max_new_tokens: int,
            sampling: SamplingParams = SamplingParams(), seed: int = 0, slots: Optional[int] = None,
            talker: Optional[Sequence[dict]] = None, max_len: Optional[int] = None) -> list[engine_lib.Reply]:
  """The replies to `samples` decoded together in `slots` slots (default: one each). talker: spoken replies,
  one dict per sample of ReplySettings' Talker fields (speaker token, max_codes, talker_sampling, talker_seed,
  stop). max_len: cache slots per conversation (default: the longest prompt and the reply, no more)."""
  longest = max(prompts.round_up(s.num_tokens, 32) for s in samples)
  engine = chat.engine(speech=talker is not None, max_len=max_len or longest + max_new_tokens,
                       slots=slots or len(samples),
                       max_new_tokens=max_new_tokens, max_codes=max(t["max_codes"] for t in talker) if talker else 0)
  rows = [dict(t, speak=True) for t in talker] if talker else [{}] * len(samples)
  out = [engine_lib.Reply(chat.prefilled(engine, s), engine_lib.ReplySettings(max_new_tokens, sampling, seed, **row),
                          keep=False) for s, row in zip(samples, rows)]
  for _ in engine.run(out):
    pass
  return out
