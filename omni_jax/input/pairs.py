"""Preference pairs (DPO data): the JSONL forms users bring and their normal form.

A preference record holds one prompt and two assistant replies to it, the chosen one and the rejected one. The
forms below may be mixed in one file (one record a line); a dataset holds pairs when config.data.preference
names it (docs/data.md, "Preference pairs"):

1. TRL, explicit prompt: {"prompt": str | [messages], "chosen": str | message | [messages], "rejected": ...}.
   A string prompt is one user turn; a string reply is one assistant turn.
2. TRL, implicit prompt: {"chosen": [messages], "rejected": [messages]}, two whole conversations: everything
   before their last (assistant) message is the prompt and must agree.
3. ms-swift: {"messages": [..., the chosen assistant reply], "rejected_response": str}, or "rejected_messages":
   the whole rejected conversation (its tags take paths from "rejected_images" / "rejected_audios" /
   "rejected_videos", defaulting to the record's lists; its prompt must name the same media).

Messages are omni_jax.input.sources' (tags fed from `images` / `audios` / `videos`, Qwen content lists, TRL's
bare {"type": "image"} parts, a top-level `system`). A reply may be spoken: `speech` (its audio, whose codes
come from the codes index as every Talker target's do) or `codes` (the speech-unit ids themselves), with an
optional `speaker`. A Talker pair gives the same text twice with two different speeches (a voice or pace
preference).

A record that cannot be a pair raises sources.PairError (reason bad_pair) naming the record (file:line) and the
field: chosen or rejected missing, the two replies identical in text and speech, or prompts that disagree.
"""

from typing import Any, Mapping, Union

from omni_jax.input import sources

PairError = sources.PairError
_REJECTED_MEDIA = tuple(f"rejected_{k}s" for k in sources.MEDIA_KINDS)
# Keys that describe one side of a pair; the rest of the record (id, system, media lists, speaker, ...) is shared.
_SIDE_KEYS = sources.PAIR_KEYS + ("prompt", "messages", "conversations") + _REJECTED_MEDIA


def _reply_messages(value: Any, field: str, name: str) -> list:
  """A chosen / rejected value as a list of raw messages (a string or a bare message is one assistant turn)."""
  if isinstance(value, str):
    return [{"role": "assistant", "content": value}]
  if isinstance(value, Mapping):
    return [{"role": "assistant", **value}]
  if isinstance(value, list) and value:
    return list(value)
  raise PairError(f"{name}: field `{field}` must be a string, a message or a non-empty list of messages, got "
                  f"{type(value).__name__ if value is not None else 'null'}")


def _prompt_messages(value: Any, name: str) -> list:
  if isinstance(value, str):
    return [{"role": "user", "content": value}]
  if isinstance(value, list):
    return list(value)
  raise PairError(f"{name}: field `prompt` must be a string or a list of messages, got {type(value).__name__}")


def _sides(record: Mapping, name: str) -> tuple[tuple[str, dict], tuple[str, dict]]:
  """((field, raw conversation record), (field, ...)) of the chosen and the rejected side."""
  shared = {k: v for k, v in record.items() if k not in _SIDE_KEYS}
  if "rejected_response" in record or "rejected_messages" in record:  # ms-swift
    key = "messages" if "messages" in record else "conversations"
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
      raise PairError(f"{name}: field `messages` (the prompt and the chosen reply) is missing or empty")
    if "rejected_messages" in record:
      rejected = record["rejected_messages"]
      if not isinstance(rejected, list) or not rejected:
        raise PairError(f"{name}: field `rejected_messages` must be a non-empty list of messages")
      other = dict(shared, **{key: rejected})
      for kind in sources.MEDIA_KINDS:
        if f"rejected_{kind}s" in record:
          other[f"{kind}s"] = record[f"rejected_{kind}s"]
      return (key, dict(shared, **{key: messages})), ("rejected_messages", other)
    given = [k for k in _REJECTED_MEDIA if k in record]
    if given:
      raise PairError(f"{name}: field `{given[0]}` with `rejected_response`: both replies answer one prompt "
                      "(give `rejected_messages` naming the same media)")
    reply = record["rejected_response"]
    if not isinstance(reply, (str, Mapping)):
      raise PairError(f"{name}: field `rejected_response` must be a string or a message, got "
                      f"{type(reply).__name__ if reply is not None else 'null'}")
    if not isinstance(messages[-1], Mapping):
      raise PairError(f"{name}: field `{key}`: its last message is not an object")
    if isinstance(reply, Mapping):
      rejected = messages[:-1] + [{"role": "assistant", **reply}]
    else:  # the chosen message with its text replaced: same role key (role or ShareGPT's from)
      last = messages[-1]
      text_key = "value" if "value" in last and "content" not in last else "content"
      rejected = messages[:-1] + [{k: v for k, v in last.items() if k not in (text_key, "speech", "codes")}
                                  | {text_key: reply}]
    return (key, dict(shared, **{key: messages})), ("rejected_response", dict(shared, **{key: rejected}))
  for field in ("chosen", "rejected"):  # TRL
    if field not in record:
      raise PairError(f"{name}: field `{field}` is missing (a preference pair needs `chosen` and `rejected`, or "
                      "ms-swift's `messages` + `rejected_response`)")
  chosen = _reply_messages(record["chosen"], "chosen", name)
  rejected = _reply_messages(record["rejected"], "rejected", name)
  if "prompt" in record:
    prompt = _prompt_messages(record["prompt"], name)
    chosen, rejected = prompt + chosen, prompt + rejected
  elif isinstance(record["chosen"], (str, Mapping)):
    raise PairError(f"{name}: field `prompt` is missing: `chosen` is a single reply (give `prompt`, or `chosen` "
                    "and `rejected` as whole conversations)")
  return ("chosen", dict(shared, messages=chosen)), ("rejected", dict(shared, messages=rejected))


def _spoken(message: Mapping) -> Any:
  return message.get("speech", message.get("codes"))


def normalize_pair(record: Union[str, bytes, Mapping], root: str = "", name: str = "?") -> dict:
  """One raw preference record -> {"id", "prompt": [messages], "chosen": message, "rejected": message,
  "use_audio_in_video", "speech_output"}; messages as sources.normalize gives them (absolute media paths,
  `speech` / `codes` / `speaker` on a spoken reply). Raises PairError (or another sources.RecordError) naming
  `name` and the field."""
  record = sources.parse(record, name)
  if not sources.is_pair(record):
    raise PairError(f"{name}: not a preference pair: needs `chosen` and `rejected` (TRL) or `messages` and "
                    "`rejected_response` / `rejected_messages` (ms-swift)")
  convs = []
  for field, side in _sides(record, name):
    where = f"{name} field `{field}`"
    last = side.get("messages", side.get("conversations"))[-1]
    role = last.get("role", sources.SHAREGPT_ROLES.get(last.get("from"))) if isinstance(last, Mapping) else None
    if role != "assistant":
      raise PairError(f"{where}: must end with the assistant reply, not {role!r}")
    try:
      conv = sources.normalize(side, root, where)
    except PairError:
      raise PairError(f"{where}: holds a preference pair itself") from None
    convs.append((field, conv))
  (cf, chosen), (rf, rejected) = convs
  prompt_c, prompt_r = chosen["messages"][:-1], rejected["messages"][:-1]
  if prompt_c != prompt_r:
    i = next((i for i, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r)))
    raise PairError(f"{name}: the prompts of `{cf}` and `{rf}` disagree at message {i} ({len(prompt_c)} and "
                    f"{len(prompt_r)} messages before the reply); both replies must answer one prompt")
  reply_c, reply_r = chosen["messages"][-1], rejected["messages"][-1]
  if reply_c["content"] == reply_r["content"] and _spoken(reply_c) == _spoken(reply_r):
    raise PairError(f"{name}: fields `{cf}` and `{rf}` hold the same reply (text and speech): nothing to prefer")
  speech = bool(record.get("speech_output", chosen["speech_output"] or rejected["speech_output"]))
  return {"id": chosen["id"] if "id" in record else name, "prompt": prompt_c, "chosen": reply_c,
          "rejected": reply_r, "use_audio_in_video": chosen["use_audio_in_video"], "speech_output": speech}


def unspoken(message: Mapping) -> dict:
  """A prompt message without its speech: only a pair's replies are the Talker's targets."""
  return {k: v for k, v in message.items() if k not in ("speech", "codes")}
