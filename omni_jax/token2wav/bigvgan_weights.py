"""BigVGAN's conversion rules: transformers' on-disk tensors (token2wav.code2wav_bigvgan_model.*) <-> ours.

Our module paths are the on-disk paths (omni_jax/models/bigvgan.py keeps the `ups.i.0` level), so the table is
only leaf renames and kernel layouts: torch Conv1d weights are [out, in, k], ConvTranspose1d weights
[in, out, k], ours are [k, in, out]. The Kaiser filters (`*.upsample.filter`, `*.downsample.filter`) are
non-persistent buffers, never in a checkpoint. The Token2Wav tower registers these rules with the converter.
"""

import re

import numpy as np

from omni_jax.convert.rules import Rule

DISK_PREFIX = "token2wav.code2wav_bigvgan_model."


def _conv_to_disk(k):  # [k, in, out] -> [out, in, k]
  return np.ascontiguousarray(np.transpose(k, (2, 1, 0)))


def _transposed_to_disk(k):  # [k, in, out] -> [in, out, k]
  return np.ascontiguousarray(np.transpose(k, (1, 2, 0)))


def _transposed_from_disk(w):  # [in, out, k] -> [k, in, out]
  return np.ascontiguousarray(np.transpose(w, (2, 0, 1)))


def rules(ours_prefix: str = "", disk_prefix: str = DISK_PREFIX) -> list[Rule]:
  """ours regex <-> disk template, for our vocoder at `ours_prefix` and the checkpoint's at `disk_prefix`."""
  o, d = re.escape(ours_prefix), disk_prefix
  return [
      Rule(o + r"(ups\.\d+\.0)\.kernel", d + r"\1.weight", _transposed_to_disk, _transposed_from_disk),
      Rule(o + r"(.*)\.kernel", d + r"\1.weight", _conv_to_disk, _conv_to_disk),  # conv_pre, convs1/2, conv_post
      Rule(o + r"(.*)\.(bias|alpha|beta)", d + r"\1.\2"),
  ]


RULES = rules()
