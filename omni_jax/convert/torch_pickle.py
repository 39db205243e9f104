"""Tensors out of a torch.save file without torch: the speaker table (spk_dict.pt) of a released checkpoint.

torch.save writes a zip archive: <name>/data.pkl, a pickle in which each tensor is a call of
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) on a storage named by a persistent id
("storage", torch.<Type>Storage, key, device, numel), and <name>/data/<key>, the storage's raw little-endian
bytes. This reader resolves those names (and collections.OrderedDict) only, building numpy arrays; any other
global, i.e. code a pickle could run, is refused, as torch's own weights_only loader refuses it. Files from
before torch's zip format (torch < 1.6) are not read.
"""

import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
           "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class TorchPickleError(ValueError):
  """The file is not a torch.save archive this reader accepts; the message says why."""


class _StorageType:
  """What the pickle's torch.<Type>Storage global resolves to: the storage's element type."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 in numpy: the view (offset, size, stride) of the storage, copied."""
  size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
    raise TorchPickleError(f"a tensor with size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:  # a view past its storage's end would read other memory
    raise TorchPickleError(f"a tensor (size {size}, stride {stride}, offset {offset}) beyond its storage of "
                           f"{storage.size} elements")
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * item for s in stride))
  return np.array(view)


class _Unpickler(pickle.Unpickler):

  def __init__(self, archive: zipfile.ZipFile, root: str):
    super().__init__(archive.open(f"{root}/data.pkl"))
    self._archive, self._root, self._storages = archive, root, {}

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("collections", "OrderedDict"):  # the tensors' (empty) backward hooks
      return collections.OrderedDict
    if module == "torch" and name in _DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refused global {module}.{name}: only tensors and plain containers are read")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    _, kind, key, _, numel = pid
    if key not in self._storages:
      data = self._archive.read(f"{self._root}/data/{key}")
      if len(data) < int(numel) * kind.dtype.itemsize:
        raise TorchPickleError(f"storage {key}: {len(data)} bytes for {numel} elements of {kind.dtype}")
      self._storages[key] = np.frombuffer(data, kind.dtype, count=int(numel))
    return self._storages[key]


def load(path) -> object:
  """The object a torch.save archive holds, with numpy arrays in place of tensors (dtypes kept; bfloat16 as
  ml_dtypes.bfloat16). Refuses anything else without running pickled code: TorchPickleError, or
  pickle.UnpicklingError for a refused global."""
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise TorchPickleError("not a torch.save zip archive (torch >= 1.6 writes one)")
  with zipfile.ZipFile(path) as archive:
    roots = [n[:-len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(roots) != 1:
      raise TorchPickleError(f"expected one <name>/data.pkl in the archive, found {len(roots)}")
    names = set(archive.namelist())
    if f"{roots[0]}/byteorder" in names and archive.read(f"{roots[0]}/byteorder").strip() != b"little":
      raise TorchPickleError("a big-endian archive")
    return _Unpickler(archive, roots[0]).load()
