"""Decoding images, video and audio into model inputs (numpy only: no jax in data workers)."""


class MediaError(ValueError):
  """A media file cannot be read or decoded; the message names the file."""
