"""The Qwen2.5-Omni tokenizer against independent references.

Reference: transformers' Qwen2Tokenizer built from vocab.json + merges.txt that this test derives from the
bundled tiktoken ranks (byte -> unicode table and BPE merge recovery written here), so the two share only
the rank table. Anchor ids come from the released checkpoint (its added_tokens.json and vocabulary).
"""

import json
import pickle

import pytest

from omni_jax.input import tokenizer as tok_lib
from omni_jax.input.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

SAMPLES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. It's 12:45, isn't it? I'll say we've won.",
    "你好，世界！今天天气很好。",
    "こんにちは、世界。カタカナとひらがな。",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Привет, мир! Ёлки-палки.",
    "مرحبا بالعالم",
    "Ça va? Ünïcödé façade naïve café",
    "emoji 🙂🚀 and symbols ∑∫√ ±",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\nwindows line",
    "   leading spaces and trailing   ",
    "numbers 1234567890 3.14159 -42 1e-10",
    "<|im_end|> typed by a user stays text",
    "cafe\u0301 (decomposed e + accent, NFC-normalised)",
    "",
]


def _byte_table() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (printable bytes map to themselves)."""
  keep = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
          | set(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _merge_pair(token: bytes, ranks: dict) -> list[bytes]:
  """The two parts BPE joins to make `token`: run BPE on its bytes with the merges ranked below it."""
  limit = ranks[token]
  parts = [bytes([b]) for b in token]
  while len(parts) > 2:
    best = min(((ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                if ranks.get(parts[i] + parts[i + 1], limit) < limit), default=None)
    if best is None:
      break
    parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
  return parts


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
  """vocab.json + merges.txt written from the tiktoken ranks."""
  ranks = tok_lib.load_ranks(tok_lib.bundled_ranks_path())
  table = _byte_table()

  def text(b):
    return "".join(table[x] for x in b)

  merges = []
  for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) > 1:
      parts = _merge_pair(token, ranks)
      assert len(parts) == 2, (token, parts)
      merges.append(f"{text(parts[0])} {text(parts[1])}")
  d = tmp_path_factory.mktemp("qwen_vocab")
  (d / "vocab.json").write_text(json.dumps({text(t): r for t, r in ranks.items()}, ensure_ascii=False))
  (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  return d


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_dir):
  from transformers import Qwen2Tokenizer

  hf = Qwen2Tokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"))
  hf.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
  return hf


@pytest.fixture(scope="module")
def tok():
  return Tokenizer()


def test_merges_reconstruct_the_released_table(vocab_dir):
  assert len((vocab_dir / "merges.txt").read_text().splitlines()) - 1 == 151387  # Qwen2's merges.txt length


def test_multilingual_ids_equal_transformers(tok, hf_tokenizer):
  for text in SAMPLES:
    expected = hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)  # plain text
    assert tok.encode(text) == expected, text
    assert tok.decode(expected) == hf_tokenizer.decode(expected)


def test_model_directory_backends_agree(tok, vocab_dir, hf_tokenizer, tmp_path):
  from_files = Tokenizer(str(vocab_dir))
  hf_tokenizer._tokenizer.save(str(tmp_path / "tokenizer.json"))
  from_json = Tokenizer(str(tmp_path))
  for text in SAMPLES:
    expected = tok.encode(text)
    assert from_files.encode(text) == expected, text
    assert from_json.encode(text) == expected, text
  assert from_json.decode([151644, 872, 198]) == "<|im_start|>user\n"


def test_anchor_ids(tok):
  assert tok.encode("Hello world!") == [9707, 1879, 0]
  assert [tok.encode(w) for w in ("user", "system", "assistant", "\n")] == [[872], [8948], [77091], [198]]


def test_special_tokens_have_the_released_ids(tok):
  expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
              "<|audio_bos|>": 151647, "<|audio_eos|>": 151648, "<|vision_bos|>": 151652, "<|vision_eos|>": 151653,
              "<|vision_pad|>": 151654, "<|IMAGE|>": 151655, "<|VIDEO|>": 151656}
  for name, i in expected.items():
    assert tok.token_id(name) == i
    assert tok.decode([i]) == name
  assert (tok_lib.TTS_PAD, tok_lib.TTS_BOS, tok_lib.TTS_EOS) == (151859, 151860, 151861)
  assert tok.vocab_size == 151665
  # Typed control tokens are text, never the control id.
  assert 151645 not in tok.encode("<|im_end|>")


def test_pickles_without_backend(tok):
  tok.encode("warm up")
  clone = pickle.loads(pickle.dumps(tok))
  assert clone._backend is None
  assert clone.encode("ship me to a worker") == tok.encode("ship me to a worker")


def test_missing_files_fail_clearly(tmp_path):
  with pytest.raises(TokenizerError, match="no such tokenizer"):
    Tokenizer(str(tmp_path / "nope"))
  with pytest.raises(TokenizerError, match="neither tokenizer.json"):
    Tokenizer(str(tmp_path))


def test_model_directory_with_other_special_ids_is_rejected(vocab_dir, tmp_path):
  # A checkpoint whose tokenizer.json puts <|IMAGE|> elsewhere must not be silently accepted.
  from tokenizers import AddedToken, Tokenizer as HFTokenizer
  from tokenizers.models import BPE

  t = HFTokenizer(BPE.from_file(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt")))
  t.add_special_tokens([AddedToken(n, special=True) for n in ["<|IMAGE|>"] + list(SPECIAL_TOKENS)])
  t.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(TokenizerError, match="disagree"):
    Tokenizer(str(tmp_path)).encode("x")
