"""Prompts for generation: a conversation (text and media files) -> a left-padded batch of the batch contract.

Media go through the training pipeline's own preprocessing (omni_jax.input.preprocess) and ChatML rendering
(omni_jax.input.chat, with the generation prompt `<|im_start|>assistant\\n`), so a prompt is tokenised and
laid out exactly as the training samples were.
"""

from typing import Optional, Sequence

import numpy as np

from omni_jax import batch as batch_lib
from omni_jax.input import chat
from omni_jax.input import preprocess
from omni_jax.input import packing


def conversation(prompt: str, *, system: Optional[str] = None, images: Sequence[str] = (),
                 audios: Sequence[str] = (), videos: Sequence[str] = (), use_audio_in_video: bool = False) -> list:
  """A one-turn conversation: the user's media parts (images, audios, videos, in that order), then the text."""
  parts = ([{"type": "image", "path": p} for p in images] + [{"type": "audio", "path": p} for p in audios]
           + [{"type": "video", "path": p, "use_audio_in_video": use_audio_in_video} for p in videos])
  parts.append({"type": "text", "text": prompt})
  messages = [{"role": "user", "content": parts}]
  if system is not None:
    messages.insert(0, {"role": "system", "content": system})
  return messages


def prompt_sample(messages: Sequence, preprocessor: preprocess.Preprocessor, name: str = "prompt") -> preprocess.Sample:
  """Render a conversation (media parts with a local `path`) ending in the assistant's generation prompt.

  A missing or undecodable media file raises preprocess.SampleError naming the file.
  """
  media = {"images": [], "videos": [], "audios": []}
  parts = [p for m in messages for p in chat.content_parts(m.get("content")) if isinstance(p, dict)]
  aiv = any(p.get("use_audio_in_video", False) for p in parts if p.get("type") == "video")
  items = [preprocessor.load_part(p, aiv, name, media) for p in parts if p.get("type") in ("image", "audio", "video")]
  kind = preprocess.sample_kind([{"content": parts}])
  messages = chat.with_system(messages, system_prompt=preprocessor.system_prompt)
  try:
    rendered = chat.render(messages, items, preprocessor.tokenizer, preprocessor.fmt, add_generation_prompt=True)
  except chat.ChatError as e:
    raise preprocess.SampleError("malformed", f"{name}: {e}") from None
  return preprocess.Sample(name, kind, rendered.input_ids, rendered.labels, media["images"], media["videos"],
                           media["audios"], aiv)


def round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def left_pad(batch: dict) -> dict:
  """Move each row's real tokens (segment_ids > 0, one segment per row) to the end of the row."""
  out = dict(batch)
  seg = np.asarray(batch["segment_ids"])
  shift = seg.shape[1] - (seg > 0).sum(axis=1)
  for f in batch_lib.TEXT_FIELDS:
    if f in batch:
      out[f] = np.stack([np.roll(row, s) for row, s in zip(np.asarray(batch[f]), shift)])
  return out


def prompt_batch(samples: Sequence[preprocess.Sample], *, pad_id: int, length_multiple: int = 32,
                 num_mel_bins: int = 128) -> dict:
  """Left-padded batch of one prompt per row; the length and media buffers are rounded up (to
  length_multiple tokens / patches, whole 2 s audio chunks) so that similar prompts share a compilation."""
  if not samples:
    raise ValueError("no prompts")
  most = lambda f: max(f(s) for s in samples)  # noqa: E731
  patches_of = lambda items: sum(len(i[0]) for i in items)  # noqa: E731
  bucket = packing.Bucket(
      seq_len=round_up(most(lambda s: s.num_tokens), length_multiple), batch_size=len(samples),
      max_images=most(lambda s: len(s.images)), max_videos=most(lambda s: len(s.videos)),
      max_audios=most(lambda s: len(s.audios)),
      max_image_patches=round_up(most(lambda s: patches_of(s.images)), length_multiple) if most(
          lambda s: len(s.images)) else 0,
      max_video_patches=round_up(most(lambda s: patches_of(s.videos)), length_multiple) if most(
          lambda s: len(s.videos)) else 0,
      max_audio_frames=round_up(most(lambda s: max((a.shape[1] for a in s.audios), default=0)), 200) if most(
          lambda s: len(s.audios)) else 0,
      num_mel_bins=num_mel_bins)
  return left_pad(packing.assemble([[s] for s in samples], bucket, pad_id))
