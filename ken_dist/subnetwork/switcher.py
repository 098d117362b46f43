"""Switch one live model between stored fine-tunes at memory speed: `Switcher`.

Why: a server holding one base model and many task fine-tunes switches between requests; reading
and decoding a fine-tune's parts per switch costs far more than writing the entries it changes.
A Switcher keeps fine-tunes *resident*: per model tensor the sorted flat indices of the kept
entries (int32 where the tensor has fewer than 2**31 entries) and their values, already in the
model's dtype and on the tensor's device, decoded and sha256-checked once. A switch then is one
vectorized scatter per tensor and nothing else: put back the base values at the current task's
indices, save the base values under the next task's indices (a gather of what the model holds
there now), write the next task's values.

Why the base values are saved on the way in instead of kept per fine-tune: restoring the base
needs them, and the model itself holds them at the moment a task is written (it holds the base
outside the current task's entries). Saving them then costs one gather per switch and keeps them
for the active task only, instead of one copy per resident fine-tune (2 bytes per kept bf16
entry each). Tensors a fine-tune stores whole (a new classifier head) are handled the same way
with "every entry" as index: the model's value is saved and put back.

Least recently used fine-tunes are dropped beyond `budget_bytes` (the active one never: its
indices are needed to put the base back). The cold path (a fine-tune not resident) reads only
the fine-tune's part files, each checked once against the manifest's sha256, in parallel threads,
and decodes them whole-part at a time through the subnetwork view (`Subnetwork.kept`, so every
store version and value codec the view reads works here); it finishes before the first write,
so a corrupt part fails `use` with a StoreError and leaves the model in its previous task.

Thread-safe: `use`, `base`, `load` and `evict` hold one lock.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ken_dist.checkpoints.dtypes import itemsize, torch_dtype
from ken_dist.checkpoints.reads import read_tensor
from ken_dist.errors import InputError, KenError, StoreError
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.targets import ATTR, expect_holds, flat_target, model_tensors, resolve_names, same_base
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork

__all__ = ["Switcher", "Resident", "decode_finetune", "write_finetune"]


@dataclass
class Entries:
    """One model tensor's share of a fine-tune: values at sorted flat `index` (None: every entry)."""
    index: torch.Tensor | None
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        idx = 0 if self.index is None else self.index.numel() * self.index.element_size()
        return idx + self.values.numel() * self.values.element_size()


@dataclass
class Resident:
    """A decoded, verified fine-tune: {model tensor name: Entries}, and what it cost to keep."""
    name: str
    tensors: dict[str, Entries]
    stored_bytes: int
    base_names: dict[str, str] = field(default_factory=dict)
    base_values: dict[str, torch.Tensor] | None = None  # only when decoded with_base=True

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    @property
    def entries(self) -> int:
        return sum(e.values.numel() for e in self.tensors.values())


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _decode_block(sub: Subnetwork, stored: str, block: dict, index: np.ndarray, raw: np.ndarray, start: int,
                  base_rows: bool) -> torch.Tensor | None:
    """Decode one part whole, straight into its slice of the tensor's arrays: flat indices into
    index[start:], value bytes into raw; returns the base values under them when base_rows."""
    t = sub.entry(stored)
    n, size = t["row_len"], itemsize(t["dtype"])
    pos, end, base = start, start + block["kept"], []
    for first, keep, values in sub.kept(stored, block["row_start"], block["row_end"]):
        local = np.flatnonzero(keep)
        if pos + local.size > end:
            pos = end + 1  # more than the manifest says: refused below
            break
        np.add(local, first * n, out=index[pos: pos + local.size], casting="unsafe")
        raw[pos * size: (pos + local.size) * size] = values
        if base_rows:
            base.append(sub.base_rows(stored, first, first + keep.shape[0]).reshape(-1)[torch.from_numpy(local)])
        pos += local.size
    if pos != end:
        raise StoreError(f"part file {sub.store.resolve(block['file'])} of tensor {stored!r} holds another number "
                         f"of kept entries than the manifest's {block['kept']}; delete it and rerun the prune command")
    return torch.cat(base) if base else None


def _whole_base(sub: Subnetwork, stored: str, held: torch.Tensor) -> torch.Tensor:
    """The base value of a tensor the fine-tune stores whole: the base checkpoint's tensor, or
    (a new head the base lacks) the value the model holds, since no base value exists."""
    base_name = sub.entry(stored).get("base_name") or stored
    info = sub.base_checkpoint.tensors.get(base_name)
    if info is None or int(np.prod(info.shape)) != held.numel():
        return held.detach().clone()
    return read_tensor(info).reshape(-1)


def decode_finetune(sub: Subnetwork, names: dict[str, str], model, *, workers: int | None = None,
                    pinned: bool = False, with_base: bool = False) -> Resident:
    """Read and decode fine-tune `sub` for `model` (names: resolve_names' result): every part in
    parallel threads, values converted to each model tensor's dtype and moved to its device
    (pinned host memory for a CUDA tensor when pinned=True). with_base: also the base values
    under the kept entries (from the base checkpoint), for a model that holds this fine-tune
    already. Raises before anything is written anywhere."""
    tensors, _ = model_tensors(model)
    flats = {s: flat_target(m, tensors[m], sub.entry(s), s, sub.finetune) for s, m in names.items()}
    for stored in names:  # every part there before reading any: one clear error naming the file
        for block in sub.entry(stored)["blocks"]:
            path = sub.store.resolve(block["file"])
            if not os.path.isfile(path):
                raise StoreError(f"part file {path} of tensor {stored!r} (fine-tune {sub.finetune!r}) is missing; "
                                 f"rerun the same `ken-dist prune` command (it rewrites missing blocks); the model "
                                 f"was not changed")
    arrays, jobs = {}, []  # per pruned tensor: its index and value arrays, filled part by part
    for stored in names:
        t = sub.entry(stored)
        if t["action"] != "prune":
            continue
        kept = sum(b["kept"] for b in t["blocks"])
        numpy_index = np.int32 if _index_dtype(flats[stored].numel()) == torch.int32 else np.int64
        arrays[stored] = (np.empty(kept, numpy_index), np.empty(kept * itemsize(t["dtype"]), np.uint8))
        start = 0
        for block in sorted(t["blocks"], key=lambda b: b["row_start"]):
            jobs.append((stored, block, start))
            start += block["kept"]
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ken-decode") as pool:
        bases = list(pool.map(lambda j: _decode_block(sub, j[0], j[1], *arrays[j[0]], j[2], with_base), jobs))
    base_parts: dict[str, list] = {}
    for (stored, _, _), base in zip(jobs, bases):
        if base is not None:
            base_parts.setdefault(stored, []).append(base)
    out, base_values, base_names = {}, {}, {}
    for stored, target in names.items():
        t, flat = sub.entry(stored), flats[stored]
        host = pinned and flat.device.type == "cuda"
        device = torch.device("cpu") if host else flat.device
        if t["action"] == "whole":
            index, values = None, sub.get_tensor(stored).reshape(-1)
            base = _whole_base(sub, stored, flat) if with_base else None
        else:
            index = torch.from_numpy(arrays[stored][0]).to(device)
            values = torch.from_numpy(arrays[stored][1]).view(torch_dtype(t["dtype"]))
            base = torch.cat(base_parts.get(stored, [flat[:0]])) if with_base else None
            base_names[target] = t.get("base_name") or stored
        values = values.to(device=device, dtype=flat.dtype)
        if host:
            values, index = values.pin_memory(), None if index is None else index.pin_memory()
        out[target] = Entries(index, values)
        if base is not None:
            base_values[target] = base.to(device=flat.device, dtype=flat.dtype)
    stored_bytes = sum(b["bytes"] for s in names for b in sub.entry(s)["blocks"])
    return Resident(sub.finetune, out, stored_bytes, base_names, base_values if with_base else None)


class _Writer:
    """The scatters and gathers of a switch on flat model tensors. torch indexes with int64 only,
    so int32 resident indices are widened into one reused buffer per device (a fresh one per
    tensor and switch would page-fault its way through memory every time)."""

    def __init__(self):
        self._long: dict[torch.device, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * 8 for b in self._long.values())

    def index(self, e: Entries, device: torch.device) -> torch.Tensor | None:
        if e.index is None or (e.index.dtype == torch.int64 and e.index.device == device):
            return e.index
        buf = self._long.get(device)
        if buf is None or buf.numel() < e.index.numel():
            buf = self._long[device] = torch.empty(e.index.numel(), dtype=torch.int64, device=device)
        return buf[: e.index.numel()].copy_(e.index, non_blocking=True)

    def put(self, flat: torch.Tensor, e: Entries, values: torch.Tensor, index=None) -> int:
        """flat[e's entries] = values (index: e's index already widened by self.index)."""
        values = values.to(flat.device, non_blocking=True)
        if e.index is None:
            flat.copy_(values)
        else:
            flat.index_copy_(0, self.index(e, flat.device) if index is None else index, values)
        return values.numel()

    def take(self, flat: torch.Tensor, e: Entries, out: torch.Tensor | None, index=None) -> torch.Tensor:
        """flat[e's entries], into `out` when it is large enough (reused across switches)."""
        n = flat.numel() if e.index is None else e.index.numel()
        if out is None or out.numel() < n:
            out = torch.empty(n, dtype=flat.dtype, device=flat.device)
        dst = out[:n]
        if e.index is None:
            dst.copy_(flat)
        else:
            torch.index_select(flat, 0, self.index(e, flat.device) if index is None else index, out=dst)
        return out


@torch.no_grad()
def write_finetune(model, res: Resident) -> int:
    """Write a decoded fine-tune into a model holding the base (apply): nothing saved to restore."""
    tensors, _ = model_tensors(model)
    writer = _Writer()
    return sum(writer.put(tensors[t].data.view(-1), e, e.values) for t, e in res.tensors.items())


class Switcher:
    """One live model, many resident fine-tunes of one store; see the module docstring.

    model: a transformers model holding the base (from_pretrained of the base, with the
    fine-tunes' config so their heads exist) or a fine-tune of `store` (load_model, apply,
    swap record which). holds: the fine-tune the model holds now when it carries no record
    (None: what the model records, else the base). budget_bytes: memory for resident
    fine-tunes (indices + values; None: unlimited, 0: only the active one); beyond it the least
    recently used are dropped. pinned: for a CUDA model keep resident fine-tunes in pinned host
    memory instead of on the device. base, name_map, strict, verify, workers: as for apply."""

    def __init__(self, model, store, *, holds: str | None = None, budget_bytes: int | None = None, base=None,
                 name_map=None, strict: bool = False, verify: bool = True, workers: int | None = None,
                 pinned: bool = False):
        if budget_bytes is not None and budget_bytes < 0:
            raise InputError(f"budget_bytes must be >= 0 or None (unlimited), got {budget_bytes}")
        self.model, self.store = model, store if isinstance(store, Store) else Store(store)
        self._base, self._name_map, self._strict = base, name_map, strict
        self._verify, self._workers, self._pinned, self._budget = verify, workers, pinned, budget_bytes
        self._lock = threading.RLock()
        self._residents: OrderedDict[str, Resident] = OrderedDict()
        self._writer = _Writer()
        self._saved: dict[str, torch.Tensor] = {}  # base values under the active fine-tune's entries
        self._saved_bufs: dict[str, torch.Tensor] = {}
        self._base_names: dict[str, str] = {}
        self._first: Subnetwork | None = None
        self._active: Resident | None = None
        self._broken: str | None = None
        held = getattr(model, ATTR, None)
        if holds is None and held:
            if held.get("finetune") is None:
                expect_holds(model, None, "?")  # raises: unknown state
            if os.path.realpath(held["store"]) != os.path.realpath(self.store.root):
                raise InputError(f"the model holds fine-tune {held['finetune']!r} of store {held['store']}, not of "
                                 f"{self.store.root}; load the model from this store, or pass holds=...")
            holds = held["finetune"]
        if holds is not None:
            res = self._decode(holds, with_base=True)
            self._saved = {k: self._keep_saved(k, v) for k, v in res.base_values.items()}
            res.base_values = None
            self._residents[holds] = self._active = res
            setattr(model, ATTR, {"store": self.store.root, "finetune": holds})

    # ---- state -------------------------------------------------------------------------------
    @property
    def active(self) -> str | None:
        """The fine-tune the model holds (None: the base)."""
        return None if self._active is None else self._active.name

    def resident(self) -> list[str]:
        """Resident fine-tunes, least recently used first."""
        with self._lock:
            return list(self._residents)

    def memory(self) -> dict:
        """Bytes held: per resident fine-tune (and its stored bytes), the saved base values of the
        active one, and the index buffers of the scatter."""
        with self._lock:
            return {"finetunes": {n: {"bytes": r.nbytes, "stored_bytes": r.stored_bytes, "entries": r.entries}
                                  for n, r in self._residents.items()},
                    "saved_base_bytes": sum(b.numel() * b.element_size() for b in self._saved_bufs.values()),
                    "index_buffer_bytes": self._writer.nbytes}

    # ---- loading -----------------------------------------------------------------------------
    def _decode(self, name: str, with_base: bool = False) -> Resident:
        if self._first is not None:
            same_base(self._first, name)
        sub = open_subnetwork(self.store, name, self._base, verify=self._verify)
        if self._first is None:
            self._first = sub
            if any(t["action"] == "prune" for t in sub.manifest()["tensors"].values()):
                self._base = sub.base_checkpoint  # opened and verified once for every fine-tune
        names = resolve_names(self.model, sub, name_map=self._name_map, strict=self._strict, warn=not with_base)
        res = decode_finetune(sub, names, self.model, workers=self._workers, pinned=self._pinned,
                              with_base=with_base)
        for target, base_name in res.base_names.items():
            if self._base_names.setdefault(target, base_name) != base_name:
                raise StoreError(f"fine-tune {name!r} writes model tensor {target!r} over base tensor "
                                 f"{base_name!r}, another fine-tune over {self._base_names[target]!r}; they "
                                 f"cannot share one model: load_model(store, {name!r}) instead")
        return res

    def load(self, name: str) -> Resident:
        """Make `name` resident without switching to it (a server warming up)."""
        with self._lock:
            res = self._residents.get(name)
            if res is None:
                res = self._residents[name] = self._decode(name)
                self._evict(protect={name, self.active})
            self._residents.move_to_end(name)
            return res

    def evict(self, name: str) -> None:
        """Drop a resident fine-tune (not the active one: its indices put the base back)."""
        with self._lock:
            if name == self.active:
                raise InputError(f"fine-tune {name!r} is active; switch away (use/base) before evicting it")
            self._residents.pop(name, None)

    def _evict(self, protect: set) -> None:
        if self._budget is None:
            return
        while sum(r.nbytes for r in self._residents.values()) > self._budget:
            victim = next((n for n in self._residents if n not in protect), None)
            if victim is None:
                return
            del self._residents[victim]

    # ---- switching ---------------------------------------------------------------------------
    def _check_model(self) -> None:
        if self._broken:
            raise KenError(f"the model is in an unknown state: {self._broken} stopped half way; load it again "
                           f"(load_model) and create a new Switcher")
        held = getattr(self.model, ATTR, None)
        now = held.get("finetune") if held else None
        if now != self.active or (held and held.get("store") != self.store.root):
            raise InputError(f"the model records fine-tune {now!r} but this Switcher put {self.active!r} in it: "
                             f"something else (apply, swap, another Switcher) changed it; create a new Switcher")

    def _keep_saved(self, target: str, values: torch.Tensor) -> torch.Tensor:
        buf = self._saved_bufs.get(target)
        if buf is None or buf.numel() < values.numel():
            buf = self._saved_bufs[target] = torch.empty_like(values)
        return buf[: values.numel()].copy_(values)

    @torch.no_grad()
    def _switch(self, nxt: Resident | None) -> dict:
        tensors, _ = model_tensors(self.model)
        prev, restored, written = self._active, 0, 0
        try:
            if prev is not None:
                for target, e in prev.tensors.items():
                    restored += self._writer.put(tensors[target].data.view(-1), e, self._saved.pop(target))
            self._active = None
            if nxt is not None:
                for target, e in nxt.tensors.items():
                    flat = tensors[target].data.view(-1)
                    index = self._writer.index(e, flat.device)
                    buf = self._saved_bufs[target] = self._writer.take(flat, e, self._saved_bufs.get(target), index)
                    self._saved[target] = buf[: e.values.numel()]
                    written += self._writer.put(flat, e, e.values, index)
            self._active = nxt
        except BaseException:
            what = f"switch to {nxt.name if nxt else 'the base'!r}"
            self._broken = what
            setattr(self.model, ATTR, {"store": self.store.root, "finetune": None, "failed": what})
            raise
        if nxt is None:
            if hasattr(self.model, ATTR):
                delattr(self.model, ATTR)
        else:
            setattr(self.model, ATTR, {"store": self.store.root, "finetune": nxt.name})
        return {"restored": restored, "entries": written,
                "tensors": len(set(nxt.tensors if nxt else ()) | set(prev.tensors if prev else ()))}

    def use(self, name: str) -> dict:
        """Put the model into fine-tune `name` in place; decodes it first when not resident (then
        a corrupt or missing part raises a StoreError and the model keeps its task). Returns
        {"finetune", "tensors", "entries" (written), "restored" (put back to the base), "cold",
        "seconds"}."""
        t0 = time.perf_counter()
        with self._lock:
            self._check_model()
            cold = name not in self._residents
            if name == self.active:
                report = {"restored": 0, "entries": 0, "tensors": 0}
            else:
                nxt = self.load(name)
                report = self._switch(nxt)
            self._residents.move_to_end(name)
            self._evict(protect={name})
        return {"finetune": name, **report, "cold": cold, "seconds": time.perf_counter() - t0}

    def base(self) -> dict:
        """Put the base back (the values the model held before any fine-tune was written)."""
        t0 = time.perf_counter()
        with self._lock:
            self._check_model()
            report = self._switch(None) if self._active is not None else {"restored": 0, "entries": 0, "tensors": 0}
            self._evict(protect=set())
        return {"finetune": None, **report, "seconds": time.perf_counter() - t0}
