"""Write a stored fine-tune into a live model, and switch a model between fine-tunes in place.

Why in place: for a 70B base with dozens of task fine-tunes, building each fine-tune's dense
tensors next to the model doubles memory, and reloading a model per task costs minutes. Here
every write goes straight into the parameter's own storage (on whatever device it lives), one
row block at a time, so the extra memory is one block and the work follows the kept entries:

- `apply(model, store, ft)`: the model holds the base; write ft's kept entries (and its whole
  tensors, e.g. a new classification head). Reads ft's part files only, not the base.
- `swap(model, store, a, b)`: put the base values back at a's kept indices (reading only the base
  rows that hold them), then write b's kept entries. Every write is a masked scatter of kept
  entries; nothing is rebuilt densely except tensors one side stores whole.

Names: stored names are the fine-tune checkpoint's. A model may name them differently: the
model class may add or lack its `base_model_prefix` (`bert.` in BertForSequenceClassification,
none in BertModel), the manifest records each pruned tensor's base name (what --map-prefix
mapped it to), and `name_map` (dict or callable) handles anything else. Tied weights (one tensor
under two names) are written once, through the name `named_parameters()` reports. Everything is
resolved and checked (names, shapes, devices, base availability) before the first write, so a
KenError never leaves the model half swapped.
"""
from __future__ import annotations

import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from ken_dist.checkpoints.dtypes import torch_dtype
from ken_dist.errors import KenError
from ken_dist.store.parts import kept_index, put_kept, take_kept
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork

__all__ = ["apply", "swap", "resolve_names"]

ATTR = "ken_subnetwork"  # set on the model: {"store", "finetune"} of the fine-tune it now holds
_BASE_CHUNK_BYTES = 64 * 2**20


def _model_tensors(model) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """({name: tensor} for every parameter and buffer name, tied names included,
    {id(tensor): canonical name}): the canonical name is the one named_parameters() reports."""
    tensors: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        tensors[n] = p
    for n, b in model.named_buffers(remove_duplicate=False):
        tensors.setdefault(n, b)
    canonical: dict[int, str] = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        canonical.setdefault(id(t), n)
    return tensors, canonical


def _candidates(name: str, entry: dict, prefix: str):
    yield name
    if prefix:
        p = prefix + "."
        yield name[len(p):] if name.startswith(p) else p + name
    if entry.get("base_name") and entry["base_name"] != name:
        yield entry["base_name"]


def resolve_names(model, sub: Subnetwork, *, name_map=None, strict: bool = False,
                  warn: bool = True) -> dict[str, str]:
    """{stored tensor name: model tensor name}, one stored name per model tensor (tied names
    collapse to one). Stored tensors the model lacks are skipped with a warning, as
    from_pretrained skips a checkpoint's unexpected keys (a classifier fine-tune keeps the
    base's lm_head.weight), or raise when strict=True; none matching at all always raises."""
    tensors, canonical = _model_tensors(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    out, owner, unmatched = {}, {}, []
    for name in sub.keys():
        entry = sub.entry(name)
        if name_map is not None:
            mapped = name_map(name) if callable(name_map) else name_map.get(name, name)
            if mapped is None:
                continue
            cands = [mapped]
        else:
            cands = _candidates(name, entry, prefix)
        target = next((c for c in cands if c in tensors), None)
        if target is None:
            if not any(p.search(name) for p in ignore):
                unmatched.append(name)
            continue
        key = canonical.get(id(tensors[target]), target)
        if key in owner:  # tied weights: keep the name the model itself reports
            if target == key:
                out.pop(owner[key])
            else:
                continue
        owner[key] = name
        out[name] = target
    if unmatched:
        shown = ", ".join(map(repr, unmatched[:8])) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
        msg = (f"{type(model).__name__} has no tensor for {len(unmatched)} stored tensor(s) of fine-tune "
               f"{sub.finetune!r}: {shown} (model names look like {next(iter(tensors), '?')!r})")
        fix = ("load the model class the fine-tune was saved with (its config.json architectures), or pass "
               "name_map={stored name: model name}")
        if strict or not out:
            raise KenError(f"{msg}; {fix}" + ("" if out else "; no stored tensor matched at all"))
        if warn:
            warnings.warn(f"{msg}; they are not loaded (as from_pretrained skips unexpected keys); if that is "
                          f"wrong, {fix}", stacklevel=3)
    return out


def _target2d(model_name: str, t: torch.Tensor, entry: dict, stored: str, finetune: str) -> torch.Tensor:
    """The model tensor viewed as [rows, row_len] (a view: writes land in the parameter)."""
    where = f"model tensor {model_name!r} (stored {stored!r} of fine-tune {finetune!r})"
    if t.device.type == "meta":
        raise KenError(f"{where} is on the meta device (offloaded by device_map or not loaded); ken_dist writes "
                       f"weights in place and cannot reach offloaded ones: give the model enough max_memory on "
                       f"GPU/CPU, or materialize() a dense checkpoint and load that")
    if t.numel() != entry["rows"] * entry["row_len"]:
        raise KenError(f"{where} has shape {list(t.shape)}, the store has {entry['shape']}; load the model class "
                       f"and config the fine-tune was saved with")
    if entry["action"] == "prune" and not t.is_floating_point():
        raise KenError(f"{where} is {t.dtype}, but the store holds {entry['dtype']} values (a quantized model?); "
                       f"load the model unquantized")
    if not t.is_contiguous():
        raise KenError(f"{where} is not contiguous; ken_dist writes into contiguous parameters only")
    return t.data.view(entry["rows"], entry["row_len"])


@torch.no_grad()
def _write_kept(sub: Subnetwork, name: str, dst: torch.Tensor) -> int:
    """dst[kept] = fine-tuned values, block by block; returns the entries written."""
    dtype, n = torch_dtype(sub.entry(name)["dtype"]), 0
    for first, keep, values in sub.kept(name):
        n += put_kept(dst[first: first + keep.shape[0]], keep, values, dtype)
    return n


@torch.no_grad()
def _restore_kept(sub: Subnetwork, name: str, dst: torch.Tensor) -> int:
    """dst[kept] = base values at the kept indices of `sub`, reading only the base rows that hold them."""
    n = 0
    for first, keep, values in sub.kept(name):
        if values.size:
            m, idx = keep.shape[0], kept_index(keep)
            n += put_kept(dst[first: first + m], idx, take_kept(sub.base_rows(name, first, first + m), idx))
    return n


@torch.no_grad()
def _write_base(sub: Subnetwork, name: str, dst: torch.Tensor) -> int:
    """dst = the base tensor, in row chunks of about 64 MiB."""
    rows, row_len = dst.shape
    step = max(1, _BASE_CHUNK_BYTES // max(1, row_len * dst.element_size()))
    for a in range(0, rows, step):
        dst[a: a + step].copy_(sub.base_rows(name, a, min(rows, a + step)))
    return dst.numel()


@torch.no_grad()
def _write_whole(sub: Subnetwork, name: str, dst: torch.Tensor) -> int:
    dst.copy_(sub.get_tensor(name).reshape(dst.shape))
    return dst.numel()


def _check_parts(sub: Subnetwork, names) -> None:
    """Every part file there before the first write (a corrupt one is still caught on read)."""
    for name in names:
        for block in sub.entry(name)["blocks"]:
            path = sub.store.resolve(block["file"])
            if not os.path.isfile(path):
                raise KenError(f"part file {path} of tensor {name!r} (fine-tune {sub.finetune!r}) is missing; "
                               f"rerun the same `ken-dist prune` command (it rewrites missing blocks); the model "
                               f"was not changed")


def _run(model, steps, workers: int | None, store_root: str, what: str) -> list:
    """Run the per-tensor steps (independent: one model tensor each) on a thread pool; the
    heavy parts (Parquet decode, sha256, numpy scatter) release the GIL. A failure half way
    marks the model as holding no known fine-tune, so no later swap trusts it."""
    workers = workers or min(8, os.cpu_count() or 1)
    try:
        if workers <= 1 or len(steps) <= 1:
            return [step() for step in steps]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ken-inject") as pool:
            return list(pool.map(lambda step: step(), steps))
    except BaseException as e:
        setattr(model, ATTR, {"store": store_root, "finetune": None, "failed": what})
        if isinstance(e, KenError):
            raise KenError(f"{e}; {what} stopped half way: the model now mixes fine-tunes, load it again "
                           f"(load_model)") from None
        raise


def _open(store, finetune: str, base, verify: bool) -> Subnetwork:
    return store if isinstance(store, Subnetwork) else open_subnetwork(store, finetune, base, verify=verify)


def _expect_holds(model, expected: str, to: str) -> None:
    """Refuse a model that ken_dist knows holds another fine-tune (or a half-finished write)."""
    held = getattr(model, ATTR, None)
    if not held or held.get("finetune") == expected:
        return
    if held.get("finetune") is None:
        raise KenError(f"the model is in an unknown state: {held.get('failed')} stopped half way; load it "
                       f"again (load_model)")
    fix = ("it already holds the target" if held["finetune"] == to else
           f"call swap(model, store, {held['finetune']!r}, {to!r})")
    raise KenError(f"the model holds fine-tune {held['finetune']!r} (store {held['store']}), not {expected!r}; {fix}")


def _apply_one(sub: Subnetwork, stored: str, dst: torch.Tensor, refill: bool) -> tuple[int, int]:
    if sub.entry(stored)["action"] == "whole":
        return _write_whole(sub, stored, dst), 0
    if refill:
        _write_base(sub, stored, dst)
    return _write_kept(sub, stored, dst), 0


def apply(model, store, finetune: str, *, base=None, strict: bool = False, name_map=None,
          verify: bool = True, workers: int | None = None, fill_from_base=(), names: dict | None = None) -> dict:
    """Write fine-tune `finetune` into `model`, which must hold the base weights (a fresh
    from_pretrained of the base, with the fine-tune's config so new heads exist).

    Pruned tensors: only the kept entries are written. Whole tensors: copied. workers: threads
    (default min(8, CPUs)). fill_from_base: model names to set to the base first (load_model
    passes what transformers could not load from the base); names: a resolve_names result to
    reuse. Returns {"finetune", "tensors", "entries", "seconds"}."""
    t0 = time.perf_counter()
    _expect_holds(model, finetune, finetune)
    sub = _open(store, finetune, base, verify)
    if names is None:
        names = resolve_names(model, sub, name_map=name_map, strict=strict)
    tensors, _ = _model_tensors(model)
    fill = set(fill_from_base)
    steps = [partial(_apply_one, sub, stored, _target2d(target, tensors[target], sub.entry(stored), stored,
                                                        sub.finetune), target in fill)
             for stored, target in names.items()]
    _check_parts(sub, names)
    done = _run(model, steps, workers, sub.store.root, f"apply of {sub.finetune!r}")
    setattr(model, ATTR, {"store": sub.store.root, "finetune": sub.finetune})
    return {"finetune": sub.finetune, "tensors": len(steps), "entries": sum(w for w, _ in done),
            "seconds": time.perf_counter() - t0}


def _same_base(a: Subnetwork, to_finetune: str) -> None:
    def files(manifest):
        return sorted((f["size"], f["header_sha256"], f.get("sample_sha256"))
                      for f in (manifest.get("base_identity") or {}).get("files") or [])
    if files(a.manifest()) != files(a.store.manifest(to_finetune)):
        raise KenError(f"fine-tunes {a.finetune!r} and {to_finetune!r} were pruned against different base "
                       f"checkpoints (their manifests' base_identity files differ); a model can only be swapped "
                       f"between fine-tunes of one base: load_model(store, {to_finetune!r}) instead")


def _swap_one(src: Subnetwork, new: Subnetwork, dst: torch.Tensor, s_old, e_old, s_new, e_new) -> tuple[int, int]:
    """One model tensor from src's values to new's: (entries written, entries restored)."""
    if e_new is not None and e_new["action"] == "whole":
        return _write_whole(new, s_new, dst), 0
    restored = 0
    if e_old is not None and e_old["action"] == "prune":
        restored = _restore_kept(src, s_old, dst)
        if e_new is not None and e_old["base_name"] != e_new["base_name"]:
            _write_base(new, s_new, dst)
    elif e_old is not None:  # stored whole before: the whole base tensor comes back
        restored = _write_base(new, s_new, dst) if e_new is not None else _write_base(src, s_old, dst)
    return (_write_kept(new, s_new, dst) if e_new is not None else 0), restored


def swap(model, store, from_finetune: str, to_finetune: str, *, base=None, strict: bool = False,
         name_map=None, verify: bool = True, workers: int | None = None) -> dict:
    """Switch `model` from fine-tune `from_finetune` to `to_finetune` in place.

    Per tensor: put the base back at from's kept indices, then write to's kept entries; tensors
    either side stores whole are written whole (base rows, or to's stored tensor). The result is
    bit for bit what load_model(store, to_finetune) gives. Returns apply's report plus
    "restored" (entries put back to the base)."""
    t0 = time.perf_counter()
    _expect_holds(model, from_finetune, to_finetune)
    src = _open(store, from_finetune, base, verify)
    _same_base(src, to_finetune)
    shared_base = base if base is not None else src._base  # opened (and checked) once for both
    new_sub = open_subnetwork(src.store, to_finetune, shared_base, verify=verify)
    old = resolve_names(model, src, name_map=name_map, strict=strict, warn=False)
    new = resolve_names(model, new_sub, name_map=name_map, strict=strict)
    tensors, _ = _model_tensors(model)
    old_by_target = {t: s for s, t in old.items()}
    new_by_target = {t: s for s, t in new.items()}
    steps = []
    for target in dict.fromkeys([*new_by_target, *old_by_target]):
        s_old, s_new = old_by_target.get(target), new_by_target.get(target)
        e_old = src.entry(s_old) if s_old else None
        e_new = new_sub.entry(s_new) if s_new else None
        view = (e_new, s_new, new_sub) if e_new else (e_old, s_old, src)
        dst = _target2d(target, tensors[target], view[0], view[1], view[2].finetune)
        if e_new is None and e_old["action"] == "whole" and (
                not e_old.get("base_name") or e_old["base_name"] not in src.base_checkpoint.tensors):
            raise KenError(f"fine-tune {from_finetune!r} stores {s_old!r} whole and neither {to_finetune!r} "
                           f"nor the base has it, so swapping cannot set it; load_model(store, {to_finetune!r}) "
                           f"instead")
        steps.append(partial(_swap_one, src, new_sub, dst, s_old, e_old, s_new, e_new))
    _check_parts(src, old)
    _check_parts(new_sub, new)
    done = _run(model, steps, workers, new_sub.store.root, f"swap {from_finetune!r} -> {to_finetune!r}")
    setattr(model, ATTR, {"store": new_sub.store.root, "finetune": new_sub.finetune})
    return {"finetune": new_sub.finetune, "tensors": len(steps), "entries": sum(w for w, _ in done),
            "restored": sum(r for _, r in done), "seconds": time.perf_counter() - t0}
