"""Tiny base / fine-tune checkpoints and a stand-in for the prune driver, for store and loader tests.

The driver's real job (select rows with KEN) does not matter here: random masks exercise the
store and the loader just as well, and keep these tests independent of the kernel and Ray."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ken_dist.checkpoints.dtypes import dtype_name
from ken_dist.checkpoints.geometry import row_geometry
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.store.protocol import Store

PARAMS = {"k": None, "keep": 0.4, "strategy": "ken", "compat": "index"}


def random_bits(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Every bit pattern of the dtype is possible (NaN payloads, -0.0, subnormals): the store
    must move bytes, not numbers."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, itemsize), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def make_checkpoints(root, tensors: dict[str, tuple[tuple, torch.dtype]], seed: int = 0):
    """Write root/base and root/ft (model.safetensors + config.json + tokenizer stub);
    returns (base dict, fine-tune dict, base dir, fine-tune dir)."""
    gen = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for name, (shape, dtype) in tensors.items():
        if dtype.is_floating_point:
            base[name] = random_bits(shape, dtype, gen)
            ft[name] = random_bits(shape, dtype, gen)
        else:
            base[name] = torch.randint(0, 100, shape, generator=gen).to(dtype)
            ft[name] = torch.randint(0, 100, shape, generator=gen).to(dtype)
    bdir, fdir = os.path.join(root, "base"), os.path.join(root, "ft")
    for d, sd in ((bdir, base), (fdir, ft)):
        os.makedirs(d, exist_ok=True)
        save_file(sd, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "toy"}, f)
    with open(os.path.join(fdir, "tokenizer_config.json"), "w") as f:
        json.dump({"tok": 1}, f)
    return base, ft, bdir, fdir


def identity(path) -> dict:
    ckpt = open_checkpoint(path)
    root, files = ckpt.root, ckpt.identity()["files"]
    return {"source": str(path), "root": root, "revision": None, "files": files}


def plan_for(ft: dict, block_rows: int = 2, base_names=None) -> dict:
    """Prune every float tensor (of those in base_names, when given: a new head is stored whole)."""
    plan = {}
    for name, t in ft.items():
        rows, row_len = row_geometry(t.shape)
        prune = t.is_floating_point() and t.dim() > 0 and (base_names is None or name in base_names)
        plan[name] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                      "action": "prune" if prune else "whole", "rows": rows, "row_len": row_len,
                      "base_name": name if prune else None,
                      "blocks": [[a, min(rows, a + block_rows)] for a in range(0, rows, block_rows)]}
    return plan


def write_all(store: Store, name: str, ft: dict, plan: dict, keep: float = 0.4, seed: int = 1,
              skip: int = 0, codec: str = "raw", base: dict | None = None) -> dict:
    """Write every planned block (all but the last `skip`) with random masks; commit them.
    A lossy `codec` needs `base` ({name: tensor} of the base). Returns {tensor: [rows, n] mask}
    for pruned tensors."""
    gen = torch.Generator().manual_seed(seed)
    masks, records = {}, []
    for tname, t in plan.items():
        if t["action"] == "whole":
            records.append(store.write_whole(name, tname, ft[tname]))
            continue
        values = ft[tname].reshape(t["rows"], t["row_len"])
        mask = torch.rand(values.shape, generator=gen) < keep
        masks[tname] = mask
        rows = base[t["base_name"]].reshape(t["rows"], t["row_len"]) if codec != "raw" else None
        for a, b in t["blocks"]:
            records.append(store.write_block(name, tname, a, b, mask[a:b], values[a:b], codec=codec,
                                             base=rows[a:b] if rows is not None else None))
    store.commit(name, records[: len(records) - skip])
    return masks


def _load_base(bdir) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(bdir)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(bdir, f)).items()}


def prune_into(store_path, name: str, ft: dict, bdir: str, fdir: str, *, keep: float = 0.4,
               block_rows: int = 2, params: dict | None = None, seed: int = 1, base_names=None,
               codec: str = "raw") -> dict:
    """begin + write + commit + finalize, as the driver does; returns the masks."""
    plan = plan_for(ft, block_rows, base_names)
    with Store(store_path, create=True) as store:
        store.begin(name, params=params or PARAMS, base_identity=identity(bdir),
                    finetune_identity=identity(fdir), tensors=plan)
        masks = write_all(store, name, ft, plan, keep=keep, seed=seed, codec=codec,
                          base=_load_base(bdir) if codec != "raw" else None)
        store.finalize(name, summary={"test": True})
    return masks


def expected(base: dict, ft: dict, masks: dict, name: str) -> torch.Tensor:
    if name not in masks:
        return ft[name]
    m = masks[name]
    out = base[name].clone().reshape(m.shape)
    out[m] = ft[name].reshape(m.shape)[m]
    return out.reshape(ft[name].shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN payloads included), dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def corrupt_part(store_path, finetune: str, tensor: str) -> str:
    """Flip one byte in the middle of the last part file of `tensor`; returns the file's path."""
    store = Store(store_path)
    path = store.resolve(store.manifest(finetune)["tensors"][tensor]["blocks"][-1]["file"])
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return path
