"""Text normalisers applied to references and replies alike before scoring (docs/evaluation.md).

transcript() (asr, WER / CER), in order:
  1. Unicode NFKC, lower case.
  2. Numbers: thousands separators dropped ("1,000" -> "1000"), then every run of digits is spelled out in
     English words ("15" -> "fifteen", "2024" -> "two thousand twenty four", "3.5" -> "three point five"), so
     "7" and "seven" agree. Ordinals and other languages' number words are left as written.
  3. Apostrophes inside words dropped ("don't" -> "dont"); every other punctuation or symbol character becomes
     a space.
  4. Runs of whitespace become one space; leading and trailing space is removed.

answer() (open, exact match): transcript() without the number rule (digits stay digits) and without the
English articles "a", "an", "the" (SQuAD's rule).
"""

import re
import unicodedata

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))


def spell(n: int) -> str:
  """A non-negative integer in English words, without "and" ("two hundred five")."""
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
  if n < 1000:
    return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + spell(n % 100))
  for scale, word in _SCALES:
    if n >= scale:
      head, rest = divmod(n, scale)
      return spell(head) + " " + word + ("" if rest == 0 else " " + spell(rest))
  raise AssertionError(n)


def _spell_match(m: re.Match) -> str:
  whole, frac = m.group(1), m.group(2)
  # Long digit strings (phone numbers, codes) are read digit by digit; they are not quantities.
  words = spell(int(whole)) if len(whole) <= 15 else " ".join(_ONES[int(d)] for d in whole)
  if frac:
    words += " point " + " ".join(_ONES[int(d)] for d in frac)
  return f" {words} "


def _punctuation_to_space(text: str) -> str:
  text = re.sub(r"(?<=\w)['\u2019](?=\w)", "", text)
  return "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)


def transcript(text: str) -> str:
  text = unicodedata.normalize("NFKC", text).lower()
  text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
  text = re.sub(r"(\d+)(?:\.(\d+))?", _spell_match, text)
  return " ".join(_punctuation_to_space(text).split())


def answer(text: str) -> str:
  text = unicodedata.normalize("NFKC", text).lower()
  words = _punctuation_to_space(text).split()
  return " ".join(w for w in words if w not in ("a", "an", "the"))
