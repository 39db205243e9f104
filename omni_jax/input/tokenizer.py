"""The Qwen2.5-Omni tokenizer: byte-level BPE over the 151,643 Qwen ranks plus the released special tokens.

Two interchangeable backends give the same ids:
* a model directory (tokenizer.json, or vocab.json + merges.txt) through the `tokenizers` library, for users
  who have the released checkpoint;
* fully offline, `qwen.tiktoken` (the same ranks, base64 lines) shipped in the dashscope wheel, through
  tiktoken with the Qwen2 pre-tokenizer regex and NFC normalisation. run.sh's set-up takes that one file out
  of the wheel into the environment's share/omni_jax/ (RANKS_FILE) without installing dashscope, whose own
  dependencies are not wanted; an installed dashscope package is looked in too.

`encode` treats its input as plain text: a user who types "<|im_end|>" gets the characters, not the control
token. Control tokens enter a sequence only as ids, placed by input.chat. `decode` never raises: an id the
tokenizer lacks (the model's embedding table has rows past its last token) has no text, and the first one
seen is logged. Instances pickle without their backend (rebuilt lazily), so they can be shipped to
data-loader worker processes.
"""

import base64
import importlib.util
import logging
import os
import sys
import unicodedata
from typing import Optional, Sequence

from omni_jax import special_tokens
from omni_jax.errors import UserError

log = logging.getLogger(__name__)

NUM_RANKS = special_tokens.NUM_RANKS  # regular byte-level BPE tokens; specials start here
SPECIAL_TOKENS = special_tokens.TOKENS  # released ids (the checkpoint's added_tokens.json)
TTS_PAD, TTS_BOS, TTS_EOS = special_tokens.TTS_PAD, special_tokens.TTS_BOS, special_tokens.TTS_EOS

# The Qwen2 pre-tokenizer: contractions, letters (with one leading non-letter), single digits, punctuation
# runs, newlines, and whitespace that never swallows the space before a word.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


class TokenizerError(UserError, ValueError):
  """No usable tokenizer files, or files that disagree with the released special ids."""


RANKS_FILE = os.path.join(sys.prefix, "share", "omni_jax", "qwen.tiktoken")  # where run.sh's set-up puts it


def bundled_ranks_path() -> Optional[str]:
  """qwen.tiktoken: RANKS_FILE, else inside an installed dashscope package (found without importing it)."""
  if os.path.exists(RANKS_FILE):
    return RANKS_FILE
  spec = importlib.util.find_spec("dashscope")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
  return path if os.path.exists(path) else None


def load_ranks(path: str) -> dict[bytes, int]:
  """{token bytes: rank} from a tiktoken file (one `base64 rank` pair a line)."""
  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  if len(ranks) != NUM_RANKS or max(ranks.values()) != NUM_RANKS - 1:
    raise TokenizerError(f"{path}: expected {NUM_RANKS} ranks 0..{NUM_RANKS - 1}, got {len(ranks)}")
  return ranks


class _Tiktoken:
  """Offline backend: tiktoken over the bundled ranks."""

  def __init__(self, path: str):
    import tiktoken  # pylint: disable=import-outside-toplevel

    self.enc = tiktoken.Encoding("qwen2_5_omni", pat_str=QWEN2_PATTERN, mergeable_ranks=load_ranks(path),
                                 special_tokens=SPECIAL_TOKENS)
    self.size = self.enc.n_vocab  # ids 0 .. size - 1 all decode

  def encode(self, text: str) -> list[int]:
    return self.enc.encode_ordinary(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.enc.decode(list(ids))


class _HFTokenizers:
  """Model-directory backend: a `tokenizers` pipeline from tokenizer.json or vocab.json + merges.txt."""

  def __init__(self, directory: str):
    # pylint: disable=import-outside-toplevel
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tj = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tj):
      tok = Tokenizer.from_file(tj)
    else:
      vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
      tok = Tokenizer(BPE.from_file(vocab, merges))
      tok.normalizer = normalizers.NFC()
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
      tok.decoder = decoders.ByteLevel()
    # Register the released specials (a no-op for a checkpoint's tokenizer.json, which has them already).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.encode_special_tokens = True  # `encode` is plain text: "<|im_end|>" typed by a user stays characters
    self.tok = tok
    wrong = {t: (tok.token_to_id(t), i) for t, i in SPECIAL_TOKENS.items() if tok.token_to_id(t) != i}
    if wrong:
      raise TokenizerError(f"{directory}: special tokens disagree with the released ids ((got, expected): {wrong})")
    self.size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)


class Tokenizer:
  """Text <-> ids for Qwen2.5-Omni. `path`: a model directory, a .tiktoken file, or None (bundled ranks)."""

  def __init__(self, path: Optional[str] = None):
    if path is None:
      path = bundled_ranks_path()
      if path is None:
        raise TokenizerError("no tokenizer: pass a model directory (tokenizer.json or vocab.json + merges.txt), "
                             f"or run `bash run.sh test` (its set-up puts qwen.tiktoken at {RANKS_FILE})")
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
      if not (os.path.exists(os.path.join(path, "tokenizer.json"))
              or all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))):
        raise TokenizerError(f"{path}: has neither tokenizer.json nor vocab.json + merges.txt")
    elif not os.path.exists(path):
      raise TokenizerError(f"{path}: no such tokenizer file or directory")
    self.path = path
    self._backend = None
    self.special = dict(SPECIAL_TOKENS)
    self._warned = False  # an undecodable id was logged once already

  @property
  def backend(self):
    if self._backend is None:
      self._backend = _HFTokenizers(self.path) if os.path.isdir(self.path) else _Tiktoken(self.path)
    return self._backend

  def __getstate__(self):
    return {"path": self.path, "special": self.special}

  def __setstate__(self, state):
    self.path, self.special, self._backend = state["path"], state["special"], None
    self._warned = False

  def encode(self, text: str) -> list[int]:
    """Ids of plain text (NFC-normalised, as the released tokenizer does); never produces special tokens."""
    return self.backend.encode(unicodedata.normalize("NFC", text))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ids; special tokens decode to their names. Never raises: an id outside 0 .. vocab_size - 1 (or
    one the backend cannot decode) has no text; the first such id is logged once per tokenizer."""
    ids = [int(i) for i in ids]
    size = self.vocab_size
    known = [i for i in ids if 0 <= i < size]
    if len(known) < len(ids):
      self._unknown(next(i for i in ids if not 0 <= i < size))
    try:
      return self.backend.decode(known)
    except Exception:  # noqa: BLE001 - a gap inside the backend's range: find the ids it rejects, drop them
      good = []
      for i in known:
        try:
          self.backend.decode([i])
          good.append(i)
        except Exception:  # noqa: BLE001
          self._unknown(i)
      try:
        return self.backend.decode(good)  # together, so that multi-byte characters split over ids stay whole
      except Exception:  # noqa: BLE001
        return ""

  def _unknown(self, token: int) -> None:
    if not self._warned:
      self._warned = True
      log.warning("tokenizer %s has no id %d (the model's vocabulary is larger): such ids decode to no text "
                  "(logged once)", self.path, token)

  def token_id(self, name: str) -> int:
    return self.special[name]

  @property
  def vocab_size(self) -> int:
    """Ids this tokenizer knows, 0 .. vocab_size - 1, special tokens included (151,665 for the released one; the
    model's embedding table is larger: 151,936 / 152,064 rows, and generation never emits the rest)."""
    return max(self.backend.size, max(self.special.values()) + 1)

