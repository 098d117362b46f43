"""Blocks as numpy storage bits (ken_dist/checkpoints/dtypes.py): exact widening, exact bytes, the same rows
as torch reads. The CPU actors depend on these to run without torch."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ken_dist.checkpoints import dtypes
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import (
    read_rows,
    read_rows_array,
    read_tensor,
    read_tensor_array,
)
from ken_dist.errors import KenError

FP8 = [n for n in ("F8_E4M3", "F8_E5M2") if hasattr(torch, dtypes._TORCH_NAMES[n])]


def _same_floats(got: np.ndarray, want: np.ndarray) -> None:
    """Equal bit for bit, except that any NaN matches any NaN."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("name", ["BF16", "F16", *FP8])
def test_to_float32_matches_torch_on_every_bit_pattern(name):
    size = dtypes.itemsize(name)
    bits = np.arange(1 << (8 * size), dtype=np.uint16 if size == 2 else np.uint8).view(dtypes.storage_dtype(name))
    ints = torch.from_numpy(bits.view(np.int16) if size == 2 else bits)
    want = ints.view(dtypes.torch_dtype(name)).to(torch.float32).numpy()
    _same_floats(dtypes.to_float32(bits, name), want)


def test_to_float32_f32_f64_and_non_floats():
    x = np.random.default_rng(0).standard_normal(1000) * 1e3
    x[:3] = [np.inf, -0.0, 1e300]
    _same_floats(dtypes.to_float32(x, "F64"), torch.from_numpy(x).to(torch.float32).numpy())
    assert dtypes.to_float32(x[3:].astype(np.float32), "F32").dtype == np.float32
    with pytest.raises(KenError, match="I64 is not a float type"):
        dtypes.to_float32(np.arange(3), "I64")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64,
                                   torch.int8, torch.bool, torch.uint8])
def test_storage_bits_are_the_tensor_bytes(dtype):
    t = (torch.randn(3, 5) * 50).to(dtype)
    bits, name = dtypes.storage_bits(t)
    assert name == dtypes.dtype_name(dtype) and dtypes.torch_dtype(name) == dtype
    assert bits.shape == (3, 5) and bits.dtype == dtypes.storage_dtype(name)
    assert bits.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_unknown_dtype_names_are_refused():
    with pytest.raises(KenError, match="unsupported dtype 'Q4'"):
        dtypes.itemsize("Q4")
    with pytest.raises(KenError, match="unsupported torch dtype"):
        dtypes.dtype_name(torch.complex128)


def test_read_rows_array_is_the_file_bytes_for_every_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(6, 7, generator=gen).to(torch.bfloat16),
               "f16": torch.randn(6, 7, generator=gen).to(torch.float16),
               "f64": torch.randn(4, 2, 3, generator=gen, dtype=torch.float64),
               "i64": torch.arange(12).reshape(3, 4), "mask": torch.rand(5, generator=gen) > 0.5,
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    for name in FP8:
        tensors[name] = torch.randn(5, 8, generator=gen).to(dtypes.torch_dtype(name))
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    on_disk = load_file(str(path))
    ck = open_checkpoint(path)
    for name, t in on_disk.items():
        info = ck.tensors[name]
        rows, row_len = info.row_geometry
        whole = read_tensor_array(info)
        assert whole.shape == tuple(t.shape) and whole.dtype == dtypes.storage_dtype(info.dtype)
        assert whole.tobytes() == dtypes.storage_bits(t)[0].tobytes(), name
        got = read_tensor(info)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert dtypes.storage_bits(got)[0].tobytes() == whole.tobytes()
        for a, b in [(0, rows), (rows // 2, rows), (1, 1)]:
            if a <= b <= rows:
                part = read_rows_array(info, a, b)
                assert part.shape == (b - a, row_len)
                assert part.tobytes() == dtypes.storage_bits(read_rows(info, a, b))[0].tobytes()
