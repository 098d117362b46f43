"""Write a stored fine-tune into a live model, and switch a model between fine-tunes in place.

Why in place: for a 70B base with dozens of task fine-tunes, building each fine-tune's dense
tensors next to the model doubles memory, and reloading a model per task costs minutes. Here
every write goes straight into the parameter's own storage (on whatever device it lives):

- `apply(model, store, ft)`: the model holds the base; write ft's kept entries (and its whole
  tensors, e.g. a new classification head). Reads ft's part files only, not the base.
- `swap(model, store, a, b)`: put the base values back at a's kept indices (reading only the base
  rows that hold them), then write b's kept entries.

Both decode the fine-tune(s) completely (switcher.decode_finetune: parts in parallel threads,
vectorized) before the first write, so a missing or corrupt part leaves the model as it was; a
write is one scatter per tensor. `swap` is a one-off Switcher (switcher.py) that keeps nothing:
for switching back and forth, hold a Switcher, which keeps fine-tunes decoded in memory. Names
are resolved by targets.resolve_names.
"""
from __future__ import annotations

import time

import torch

from ken_dist.subnetwork.switcher import Switcher, decode_finetune, write_finetune
from ken_dist.subnetwork.targets import ATTR, expect_holds, flat_target, model_tensors, resolve_names, same_base
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork

__all__ = ["apply", "swap", "resolve_names"]

_BASE_CHUNK_BYTES = 64 * 2**20


@torch.no_grad()
def _write_base(sub: Subnetwork, name: str, dst: torch.Tensor) -> None:
    """dst (flat) = the base tensor, in row chunks of about 64 MiB."""
    t = sub.entry(name)
    rows, row_len = t["rows"], t["row_len"]
    dst = dst.view(rows, row_len)
    step = max(1, _BASE_CHUNK_BYTES // max(1, row_len * dst.element_size()))
    for a in range(0, rows, step):
        dst[a: a + step].copy_(sub.base_rows(name, a, min(rows, a + step)))


def _open(store, finetune: str, base, verify: bool) -> Subnetwork:
    return store if isinstance(store, Subnetwork) else open_subnetwork(store, finetune, base, verify=verify)


def apply(model, store, finetune: str, *, base=None, strict: bool = False, name_map=None,
          verify: bool = True, workers: int | None = None, fill_from_base=(), names: dict | None = None) -> dict:
    """Write fine-tune `finetune` into `model`, which must hold the base weights (a fresh
    from_pretrained of the base, with the fine-tune's config so new heads exist).

    Pruned tensors: only the kept entries are written. Whole tensors: copied. workers: decode
    threads (default min(8, CPUs)). fill_from_base: model names to set to the base first
    (load_model passes what transformers could not load from the base); names: a resolve_names
    result to reuse. Returns {"finetune", "tensors", "entries", "seconds"}."""
    t0 = time.perf_counter()
    expect_holds(model, finetune, finetune)
    sub = _open(store, finetune, base, verify)
    if names is None:
        names = resolve_names(model, sub, name_map=name_map, strict=strict)
    res = decode_finetune(sub, names, model, workers=workers, compact=False)  # written once, then dropped
    tensors, _ = model_tensors(model)
    fill = {s: flat_target(t, tensors[t], sub.entry(s), s, sub.finetune) for s, t in names.items()
            if t in set(fill_from_base) and sub.entry(s)["action"] == "prune"}
    try:
        for stored, dst in fill.items():
            _write_base(sub, stored, dst)
        entries = write_finetune(model, res)
    except BaseException:
        setattr(model, ATTR, {"store": sub.store.root, "finetune": None, "failed": f"apply of {finetune!r}"})
        raise
    setattr(model, ATTR, {"store": sub.store.root, "finetune": sub.finetune})
    return {"finetune": sub.finetune, "tensors": len(res.tensors), "entries": entries,
            "seconds": time.perf_counter() - t0}


def swap(model, store, from_finetune: str, to_finetune: str, *, base=None, strict: bool = False,
         name_map=None, verify: bool = True, workers: int | None = None) -> dict:
    """Switch `model` from fine-tune `from_finetune` to `to_finetune` in place.

    Per tensor: put the base back at from's kept indices, then write to's kept entries; tensors
    either side stores whole are written whole. The result is bit for bit what
    load_model(store, to_finetune) gives. Returns apply's report plus "restored" (entries put
    back to the base)."""
    t0 = time.perf_counter()
    expect_holds(model, from_finetune, to_finetune)
    src = _open(store, from_finetune, base, verify)
    same_base(src, to_finetune)
    switcher = Switcher(model, src.store, holds=from_finetune, budget_bytes=0, name_map=name_map, strict=strict,
                        verify=verify, workers=workers, base=base if base is not None else src._base)
    report = switcher.use(to_finetune)
    return {"finetune": to_finetune, "tensors": report["tensors"], "entries": report["entries"],
            "restored": report["restored"], "seconds": time.perf_counter() - t0}
