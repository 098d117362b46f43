"""Generated Llama-shaped base / fine-tune checkpoint pairs of any size, streamed to disk.

Used by the demo, the tests and the benchmarks: nothing is downloaded, and a 10B pair can be
written with a few hundred MB of memory because each safetensors shard is written header first,
then tensor by tensor in row chunks (the format is a JSON header followed by raw bytes).
The fine-tune is the base plus a realistic perturbation: a small dense delta on every weight,
and a few rows per matrix moved much further (as task-specific fine-tuning does).
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ken_dist.errors import KenError

_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_ITEM = {"bf16": 2, "fp16": 2, "fp32": 4}
CHUNK_ELEMENTS = 8 * 2**20


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 176
    layers: int = 2
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 4

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, head_dim = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def parameters(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
        }


def _values(name: str, shape: tuple[int, ...], start: int, stop: int, seed: int, finetune: bool) -> np.ndarray:
    """Rows [start, stop) of a tensor, deterministic in (seed, name, row): base or fine-tune."""
    row_len = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    out = np.empty((stop - start, row_len), dtype=np.float32)
    key = zlib.crc32(name.encode())
    for r in range(start, stop):
        rng = np.random.default_rng([seed, key, r])
        if name.endswith("norm.weight"):
            base = 1.0 + rng.standard_normal(row_len).astype(np.float32) * 0.05
        else:
            base = rng.standard_normal(row_len).astype(np.float32) * 0.02
        if finetune:
            delta = rng.standard_normal(row_len).astype(np.float32) * 0.002
            if rng.random() < 0.05:  # a few rows moved much further
                delta *= 10
            base = base + delta
        out[r - start] = base
    return out


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int, finetune: bool) -> None:
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * _ITEM[dtype]
        header[name] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            rows = shape[0] if len(shape) > 1 else 1
            row_len = int(np.prod(shape)) // rows
            step = max(1, CHUNK_ELEMENTS // row_len)
            for a in range(0, rows, step):
                chunk = torch.from_numpy(_values(name, shape, a, min(rows, a + step), seed, finetune))
                f.write(chunk.to(_TORCH[dtype]).contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)


def write_checkpoint(out: str | Path, shape: LlamaShape, *, dtype: str = "bf16", seed: int = 0,
                     finetune: bool = False, shard_bytes: int = 5 * 10**9) -> Path:
    """Write one checkpoint (base or fine-tune of `seed`) as HF-style safetensors shards + config."""
    if dtype not in _TORCH:
        raise KenError(f"dtype must be one of {', '.join(_TORCH)}, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for name, tshape in shape.tensors():
        nbytes = int(np.prod(tshape)) * _ITEM[dtype]
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tshape))
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        _write_shard(out / "model.safetensors", shards[0], dtype, seed, finetune)
    else:
        weight_map, total = {}, 0
        for i, tensors in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(out / fname, tensors, dtype, seed, finetune)
            for name, tshape in tensors:
                weight_map[name] = fname
                total += int(np.prod(tshape)) * _ITEM[dtype]
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    return out


def write_pair(root: str | Path, shape: LlamaShape, *, dtype: str = "bf16", seed: int = 0,
               shard_bytes: int = 5 * 10**9) -> tuple[Path, Path]:
    """A base and its fine-tune under root/base and root/finetune."""
    root = Path(root)
    base = write_checkpoint(root / "base", shape, dtype=dtype, seed=seed, shard_bytes=shard_bytes)
    ft = write_checkpoint(root / "finetune", shape, dtype=dtype, seed=seed, finetune=True, shard_bytes=shard_bytes)
    return base, ft
