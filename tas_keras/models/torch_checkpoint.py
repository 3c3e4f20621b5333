"""Reads a PyTorch state dict saved in PyTorch's legacy (non-zip) `torch.save` format, with numpy alone.

The legacy file is a sequence of pickles: a magic number, the protocol version, system information,
the state dict itself (whose tensors refer by persistent id to storages that follow it), the list of
storage keys, and then each storage in that order: its element count as a little-endian int64 and its
raw little-endian bytes. The unpickler below accepts only the few globals a state dict of tensors
names (an ordered dict, the tensor rebuild function, the storage types), so a file cannot run code.
"""

import collections
import os
import pickle
import struct

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                  "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class CheckpointError(ValueError):
    """The file is not a legacy PyTorch state dict of tensors that this reader can read."""


class _TensorView:
    """A tensor whose storage has not been read yet."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self, storages):
        data = storages[self.storage]
        itemsize = data.dtype.itemsize
        strided = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                                  strides=[s * itemsize for s in self.stride])
        return np.array(strided)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    del unused  # requires_grad, backward hooks: nothing a state dict's values need
    return _TensorView(storage, offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path, self.storage_types = path, {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        raise CheckpointError(f"{self.path}: refers to {module}.{name}, which a state dict of tensors does not")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r}")
        _, storage_type, key = pid[:3]
        self.storage_types[key] = storage_type
        return key


def load_state_dict(path):
    """{name: numpy array} of the legacy PyTorch checkpoint at `path`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if pickle.load(f) != LEGACY_MAGIC:
                raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint (wrong magic number)")
            pickle.load(f)  # protocol version
            system = pickle.load(f)
            if not system.get("little_endian", False):
                raise CheckpointError(f"{path}: written on a big-endian machine")
            unpickler = _StateDictUnpickler(f, path)
            state = unpickler.load()
            keys = pickle.load(f)
            storages = {}
            for key in keys:
                dtype = np.dtype(STORAGE_DTYPES[unpickler.storage_types[key]]).newbyteorder("<")
                (count,) = struct.unpack("<q", f.read(8))
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise CheckpointError(f"{path}: truncated in storage {key}")
                storages[key] = np.frombuffer(raw, dtype)
    except (pickle.UnpicklingError, EOFError, struct.error, AttributeError, KeyError) as error:
        raise CheckpointError(f"{path}: not a readable legacy PyTorch checkpoint ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {name: value.materialise(storages) for name, value in state.items() if isinstance(value, _TensorView)}
