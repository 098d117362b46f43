"""Safetensors dtype names and their numpy and torch forms, without importing torch.

Why: the CPU selection actors work on numpy alone (importing torch would cost each actor
seconds of start-up and hundreds of MB: docs/performance.md), so a block travels as a numpy array of its *storage bits*:
the numpy dtype of the same name where numpy has one, a same-size unsigned integer where it
has not (bf16, fp8). `to_float32` widens those bits exactly, which is what selection needs;
the store writes the bits untouched. Only the functions handing out torch dtypes import torch.
"""
from __future__ import annotations

import sys
from functools import lru_cache

import numpy as np

from ken_dist.checkpoints.header import DTYPE_BITS
from ken_dist.errors import KenError

# safetensors dtype -> numpy dtype of its storage bits (exact where numpy has the type)
STORAGE = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64,
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "C64": np.complex64,
    "BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8,
}
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}


def _known(name: str) -> str:
    if name not in STORAGE:
        raise KenError(f"unsupported dtype {name!r}; known: {', '.join(sorted(STORAGE))}")
    return name


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype ("BF16" -> 2)."""
    return DTYPE_BITS[_known(name)] // 8


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype a block of `name` is carried in (its bits; see the module docstring)."""
    return np.dtype(STORAGE[_known(name)])


def bits_word(size: int) -> np.dtype:
    """The unsigned integer numpy dtype of `size` bytes (1, 2, 4 or 8). Values moved as these words
    (compress, gather, scatter) are copied bit for bit, never converted as floats on the way."""
    if size not in (1, 2, 4, 8):
        raise KenError(f"no {size}-byte integer word; element sizes are 1, 2, 4 or 8 bytes")
    return np.dtype(f"u{size}")


def is_torch_tensor(x) -> bool:
    """True for a torch tensor; never imports torch (a tensor cannot exist before it is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype string ("BF16" -> torch.bfloat16). Imports torch."""
    import torch

    attr = _TORCH_NAMES.get(_known(name))
    if not hasattr(torch, attr):
        raise KenError(f"dtype {name} has no torch equivalent in torch {torch.__version__}")
    return getattr(torch, attr)


def dtype_name(dtype) -> str:
    """The safetensors name of a torch dtype (torch.bfloat16 -> "BF16")."""
    import torch

    for name, attr in _TORCH_NAMES.items():
        if getattr(torch, attr, None) == dtype:
            return name
    raise KenError(f"unsupported torch dtype {dtype}; known: {', '.join(sorted(_TORCH_NAMES))}")


def storage_bits(t) -> tuple[np.ndarray, str]:
    """(numpy storage-bits array of the same shape, dtype name) of a CPU torch tensor, no copy
    when contiguous: the numpy form of a tensor for the store's writers."""
    import torch

    name = dtype_name(t.dtype)
    t = t.detach().cpu().contiguous()
    if name in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"):
        t = t.view(torch.int16 if t.element_size() == 2 else torch.uint8)  # no numpy dtype: the bits
    arr = t.numpy()
    return arr.view(storage_dtype(name)), name


def as_numpy(x) -> np.ndarray:
    """A torch tensor's storage bits (storage_bits), or the numpy array itself."""
    return storage_bits(x)[0] if is_torch_tensor(x) else np.asarray(x)


def from_storage_bits(bits: np.ndarray, name: str):
    """The torch tensor of dtype `name` over a storage-bits array, no copy (storage_bits' inverse)."""
    import torch

    want = torch_dtype(name)
    t = torch.from_numpy(bits.view(np.int16) if bits.dtype == np.uint16 else bits)
    return t if t.dtype == want else t.view(want)


@lru_cache(maxsize=None)
def _fp8_table(exp_bits: int, man_bits: int, bias: int, ieee_special: bool) -> np.ndarray:
    """float32 value of each of the 256 fp8 codes (E4M3FN: no inf, S.1111.111 is NaN; E5M2: IEEE)."""
    codes = np.arange(256)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    frac = man / float(1 << man_bits)
    value = np.where(exp == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (exp - bias))
    top = (1 << exp_bits) - 1
    if ieee_special:
        value = np.where(exp == top, np.where(man == 0, np.inf, np.nan), value)
    else:
        value = np.where((exp == top) & (man == (1 << man_bits) - 1), np.nan, value)
    table = (sign * value).astype(np.float32)
    table.setflags(write=False)  # cached and shared by every call
    return table


_FP8 = {"F8_E4M3": lambda: _fp8_table(4, 3, 7, False), "F8_E5M2": lambda: _fp8_table(5, 2, 15, True)}


def to_float32(bits: np.ndarray, name: str) -> np.ndarray:
    """Float32 values of a storage-bits array of float dtype `name` (exact for bf16/f16/fp8)."""
    if name == "BF16":  # bf16 is the top half of a float32: one widening shift, no temporaries
        out = np.empty(bits.shape, np.uint32)
        np.left_shift(bits, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    if name in ("F16", "F32", "F64"):
        with np.errstate(over="ignore"):  # f64 beyond float32 becomes inf, as in torch; selection refuses it
            return np.asarray(bits, dtype=np.float32)
    if name in _FP8:
        return _FP8[name]()[bits]
    raise KenError(f"dtype {name} is not a float type; integer and bool tensors are never pruned "
                   "(store them whole)")
