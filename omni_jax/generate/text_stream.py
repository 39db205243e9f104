"""Token ids -> text pieces as a reply is decoded: the one streamer of every streaming caller."""

from typing import Callable, Collection, Sequence


class TextStream:
  """Accumulates a reply's ids and hands out the text not shown yet. A piece that ends inside a multi-byte
  character (the decoder's U+FFFD) is held back until the character is complete; stop ids are never shown."""

  def __init__(self, decode: Callable[[Sequence[int]], str], stop_ids: Collection[int] = ()):
    self._decode, self._stop = decode, frozenset(int(i) for i in stop_ids)
    self.ids: list[int] = []
    self.shown = ""

  @property
  def text(self) -> str:
    return self._decode([i for i in self.ids if i not in self._stop])

  def add(self, token: int) -> str:
    """The text the reply gained with `token` ("" while a character is incomplete)."""
    self.ids.append(int(token))
    return self._take(final=False)

  def finish(self) -> str:
    """Whatever is still held back."""
    return self._take(final=True)

  def _take(self, final: bool) -> str:
    text = self.text
    if (not final and text.endswith("\ufffd")) or len(text) <= len(self.shown):
      return ""
    piece, self.shown = text[len(self.shown):], text
    return piece
