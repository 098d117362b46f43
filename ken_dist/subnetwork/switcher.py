"""Switch one live model between stored fine-tunes at memory speed: `Switcher`.

Why: a server holding one base model and many task fine-tunes switches between requests; reading
and decoding a fine-tune's parts per switch costs far more than writing the entries it changes.
A Switcher keeps fine-tunes *resident*, decoded and sha256-checked once: per model tensor the
kept positions in compact form (the stored bitmask, or one-byte gaps, whichever is smaller) and
the kept values in the model's dtype, on the tensor's device (entries.py). A switch then writes
only what changes, one pass per tensor over those positions (entries.walk: compiled on the CPU,
tensors in parallel threads; torch index ops on another device): put back the base values at the
current task's positions, then at the next task's save the value the model holds (the base) and
write the task's value.

Why the base values are saved on the way in instead of kept per fine-tune: restoring the base
needs them, and the model itself holds them at the moment a task is written (it holds the base
outside the current task's entries). Saving them then costs nothing extra (the same pass that
writes) and keeps them for the active task only, instead of one copy per resident fine-tune (2
bytes per kept bf16 entry each). Tensors a fine-tune stores whole (a new classifier head) are
handled the same way with "every entry" as positions: the model's value is saved and put back.

Least recently used fine-tunes are dropped beyond `budget_bytes` (the active one never: its
positions are needed to put the base back). The cold path (a fine-tune not resident) reads only
the fine-tune's part files, each checked once against the manifest's sha256, in parallel
threads, while a background thread asks the kernel to read the next ones ahead (store/fs.prefetch:
a fine-tune on disk is read while the parts already read are decoded), and decodes them through store/parts.block_bitmasks (so every store version and value
codec works here): a stored bitmask is copied as it is, never unpacked, and the switch that
follows turns it into gaps (when smaller) in the same walk that writes it. Decoding finishes
before the first write, so a corrupt part fails `use` with a StoreError and leaves the model in
its previous task.

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
from ken_dist.store.fs import prefetch
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.entries import PUT, SWAP, TAKE, Entries, compact_positions, walk, walk_compacting
from ken_dist.subnetwork.targets import ATTR, expect_holds, flat_target, model_tensors, resolve_names, same_base
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork

__all__ = ["Switcher", "Resident", "Entries", "decode_finetune", "write_finetune"]


@dataclass
class Resident:
    """A decoded, verified fine-tune: {model tensor name: Entries}, and what it cost to keep."""
    name: str
    tensors: dict[str, Entries]
    stored_bytes: int
    base_names: dict[str, str] = field(default_factory=dict)
    base_values: dict[str, torch.Tensor] | None = None  # only when decoded with_base=True
    compact: bool = True  # False: bitmasks not yet put in their smaller form (decode_finetune)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    @property
    def entries(self) -> int:
        return sum(e.values.numel() for e in self.tensors.values())


def _workers(workers: int | None) -> int:
    return max(1, workers or min(8, os.cpu_count() or 1))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _in_threads(fn, items: list, workers: int) -> list:
    """[fn(item) for item in items], spread over `workers` threads when there are several items.
    The threads are one shared pool (a switch of a small model costs less than starting threads);
    no job submits to it, so nothing waits on itself."""
    global _POOL
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(i) for i in items]
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=max(workers, min(8, os.cpu_count() or 1)),
                                       thread_name_prefix="ken-switch")
        pool = _POOL
    batches = [pool.submit(lambda part: [fn(i) for i in part], items[w::workers]) for w in range(workers)]
    done = [b.result() for b in batches]
    return [done[k % workers][k // workers] for k in range(len(items))]


def _decode_block(sub: Subnetwork, stored: str, block: dict, path: str, mask: np.ndarray, raw: np.ndarray,
                  start: int) -> None:
    """Decode one part (at path) whole, straight into the tensor's arrays: its rows' bitmask bytes
    into mask, its value bytes into raw from kept entry `start` on."""
    t = sub.entry(stored)
    nb, size = (t["row_len"] + 7) // 8, itemsize(t["dtype"])
    pos, end = start, start + block["kept"]
    where = f"part file {path} of tensor {stored!r}"
    for first, packed, values in sub.bitmasks(stored, block, path):
        count = values.size // size
        if pos + count > end:
            pos = end + 1  # more than the manifest says: refused below
            break
        if first + packed.shape[0] > t["rows"]:
            raise StoreError(f"{where} holds rows past the tensor's {t['rows']}; delete it and rerun the prune "
                             f"command")
        mask[first * nb: first * nb + packed.size] = packed.reshape(-1)
        raw[pos * size: (pos + count) * size] = values
        pos += count
    if pos != end:
        raise StoreError(f"{where} holds another number of kept entries than the manifest's {block['kept']}; "
                         f"delete it and rerun the prune command")


def _whole_base(sub: Subnetwork, stored: str, held: torch.Tensor) -> torch.Tensor:
    """The base value of a tensor the fine-tune stores whole: the base checkpoint's tensor, or
    (a new head the base lacks) the value the model holds, since no base value exists."""
    base_name = sub.entry(stored).get("base_name") or stored
    info = sub.base_checkpoint.tensors.get(base_name)
    if info is None or int(np.prod(info.shape)) != held.numel():
        return held.detach().clone()
    return read_tensor(info).reshape(-1)


def _pruned_base(sub: Subnetwork, stored: str, e: Entries) -> torch.Tensor:
    """The base checkpoint's values under e's positions (e still on the CPU), in the base's dtype."""
    base = read_tensor(sub.base_checkpoint.tensors[sub.entry(stored)["base_name"]]).reshape(-1).contiguous()
    out = torch.empty(e.values.numel(), dtype=base.dtype)
    walk(e, base, TAKE, saved=out)
    return out


def decode_finetune(sub: Subnetwork, names: dict[str, str], model, *, workers: int | None = None,
                    pinned: bool = False, with_base: bool = False, compact: bool = True) -> Resident:
    """Read and decode fine-tune `sub` for `model` (names: resolve_names' result): every part in
    parallel threads, positions in compact form, values converted to each model tensor's dtype,
    all moved to its device (pinned host memory for a CUDA tensor when pinned=True). with_base:
    also the base values under the kept entries (from the base checkpoint), for a model that
    holds this fine-tune already. compact=False leaves the bitmasks of CPU tensors as they are
    (Resident.compact False): for a caller that walks them next anyway (walk_compacting finds
    the gaps in that pass) or drops them after one write. Raises before anything is written
    anywhere."""
    tensors, _ = model_tensors(model)
    flats = {s: flat_target(m, tensors[m], sub.entry(s), s, sub.finetune) for s, m in names.items()}
    paths = {}
    for stored in names:  # every part there before reading any: one clear error naming the file
        for block in sub.entry(stored)["blocks"]:
            path = paths[block["file"]] = sub.store.resolve(block["file"])
            if not os.path.isfile(path):
                raise StoreError(f"part file {path} of tensor {stored!r} (fine-tune {sub.finetune!r}) is missing; "
                                 f"rerun the same `ken-dist prune` command (it rewrites missing blocks); the model "
                                 f"was not changed")
    arrays, jobs = {}, []  # per pruned tensor: its bitmask and value bytes, filled part by part
    for stored in names:
        t = sub.entry(stored)
        if t["action"] != "prune":
            continue
        kept = sum(b["kept"] for b in t["blocks"])
        arrays[stored] = (np.zeros(t["rows"] * ((t["row_len"] + 7) // 8), np.uint8),
                          np.empty(kept * itemsize(t["dtype"]), np.uint8), kept)
        start = 0
        for block in sorted(t["blocks"], key=lambda b: b["row_start"]):
            jobs.append((stored, block, start))
            start += block["kept"]
    workers = _workers(workers)
    threading.Thread(target=prefetch, args=([paths[j[1]["file"]] for j in jobs],), daemon=True,
                     name="ken-prefetch").start()
    _in_threads(lambda j: _decode_block(sub, j[0], j[1], paths[j[1]["file"]], *arrays[j[0]][:2], j[2]), jobs, workers)

    def finish(stored: str):
        t, flat, target = sub.entry(stored), flats[stored], names[stored]
        if t["action"] == "whole":
            e = Entries(sub.get_tensor(stored).reshape(-1).to(flat.dtype))
            base = _whole_base(sub, stored, flat) if with_base else None
        else:
            mask, raw, kept = arrays.pop(stored)
            try:  # _decode_block counted every row's entries against its values and the manifest
                form = compact_positions(mask, t["row_len"], kept, counted=True) \
                    if compact or flat.device.type != "cpu" else {"mask": mask}
            except ValueError as exc:
                raise StoreError(f"tensor {stored!r} of fine-tune {sub.finetune!r}: {exc}; delete its part files "
                                 f"and rerun the prune command") from None
            dtype = torch_dtype(t["dtype"])
            values = (torch.from_numpy(raw).view(dtype) if raw.size else torch.empty(0, dtype=dtype)).to(flat.dtype)
            e = Entries(values, t["row_len"], **{k: torch.from_numpy(v) for k, v in form.items()})
            base = _pruned_base(sub, stored, e) if with_base else None
        host = pinned and flat.device.type == "cuda"
        e = e.to(flat.device, pinned=host)
        return target, e, None if base is None else base.to(device=flat.device, dtype=flat.dtype)

    done = _in_threads(finish, list(names), workers)
    base_names = {names[s]: sub.entry(s).get("base_name") or s for s in names if sub.entry(s)["action"] == "prune"}
    stored_bytes = sum(b["bytes"] for s in names for b in sub.entry(s)["blocks"])
    return Resident(sub.finetune, {t: e for t, e, _ in done}, stored_bytes, base_names,
                    {t: b for t, _, b in done} if with_base else None, compact=compact)


def _walk_all(model, fn, targets: list, workers: int | None = None, torch_ops: bool = False) -> list:
    """fn(target, flat tensor) for every target: CPU tensors in parallel threads (the compiled
    walks release the GIL), others one after another (their device orders the work anyway)."""
    tensors, _ = model_tensors(model)
    flats = {t: tensors[t].data.view(-1) for t in targets}
    cpu = [t for t in targets if flats[t].device.type == "cpu" and not torch_ops]
    other = [t for t in targets if t not in set(cpu)]
    return _in_threads(lambda t: fn(t, flats[t]), cpu, _workers(workers)) + [fn(t, flats[t]) for t in other]


@torch.no_grad()
def write_finetune(model, res: Resident, workers: int | None = None) -> int:
    """Write a decoded fine-tune into a model holding the base (apply): nothing saved to restore."""
    return sum(_walk_all(model, lambda t, flat: walk(res.tensors[t], flat, PUT, values=res.tensors[t].values),
                         list(res.tensors), workers))


class Switcher:
    """One live model, many resident fine-tunes of one store; see the module docstring.

    model: a transformers model holding the base (from_pretrained of the base, with the
    fine-tunes' config so their heads exist) or a fine-tune of `store` (load_model, apply,
    swap record which). holds: the fine-tune the model holds now when it carries no record
    (None: what the model records, else the base). budget_bytes: memory for resident
    fine-tunes (positions + values, as memory() counts them; None: unlimited, 0: only the active one); beyond it the least
    recently used are dropped. pinned: for a CUDA model keep resident fine-tunes in pinned host
    memory instead of on the device. base, name_map, strict, verify, workers: as for apply.
    `_torch_ops = True` switches CPU tensors with the torch-op path a CUDA model takes (tests)."""

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
        self._torch_ops = False
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
            self._saved, self._saved_bufs = dict(res.base_values), dict(res.base_values)
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
        """Bytes held: per resident fine-tune (and its stored bytes, entries and how many of its
        tensors keep positions as mask / gaps), and the saved base values of the active one."""
        with self._lock:
            return {"finetunes": {n: {"bytes": r.nbytes, "stored_bytes": r.stored_bytes, "entries": r.entries,
                                      "forms": {f: sum(e.form == f for e in r.tensors.values())
                                                for f in ("mask", "gaps", "whole")}}
                                  for n, r in self._residents.items()},
                    "saved_base_bytes": sum(b.numel() * b.element_size() for b in self._saved_bufs.values())}

    # ---- loading -----------------------------------------------------------------------------
    def _decode(self, name: str, with_base: bool = False, compact: bool = True) -> Resident:
        if self._first is not None:
            same_base(self._first, name)
        sub = open_subnetwork(self.store, name, self._base, verify=self._verify)
        if self._first is None:
            self._first = sub
            if any(t["action"] == "prune" for t in sub.manifest()["tensors"].values()):
                self._base = sub.base_checkpoint  # opened and verified once for every fine-tune
        names = resolve_names(self.model, sub, name_map=self._name_map, strict=self._strict, warn=not with_base)
        res = decode_finetune(sub, names, self.model, workers=self._workers, pinned=self._pinned,
                              with_base=with_base, compact=compact)
        for target, base_name in res.base_names.items():
            if self._base_names.setdefault(target, base_name) != base_name:
                raise StoreError(f"fine-tune {name!r} writes model tensor {target!r} over base tensor "
                                 f"{base_name!r}, another fine-tune over {self._base_names[target]!r}; they "
                                 f"cannot share one model: load_model(store, {name!r}) instead")
        return res

    def load(self, name: str) -> Resident:
        """Make `name` resident without switching to it (a server warming up)."""
        return self._load(name, compact=True)

    def _load(self, name: str, compact: bool) -> Resident:
        """load(); compact=False when a switch to it follows (the switch compacts it)."""
        with self._lock:
            res = self._residents.get(name)
            if res is None:
                res = self._residents[name] = self._decode(name, compact=compact)
                self._evict(protect={name, self.active})
            self._residents.move_to_end(name)
            return res

    def evict(self, name: str) -> None:
        """Drop a resident fine-tune (not the active one: its positions put the base back)."""
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

    @torch.no_grad()
    def _switch(self, nxt: Resident | None) -> dict:
        prev = self._active
        targets = list(dict.fromkeys([*(prev.tensors if prev else ()), *(nxt.tensors if nxt else ())]))
        saved, bufs = self._saved, self._saved_bufs
        compacted = {}  # a fresh nxt's tensors in their smaller form, found by the walk that writes them

        def one(target: str, flat: torch.Tensor) -> tuple[int, int]:
            restored = written = 0
            if prev is not None and target in prev.tensors:
                restored = walk(prev.tensors[target], flat, PUT, values=saved[target], torch_ops=self._torch_ops)
            if nxt is not None and target in nxt.tensors:
                e = nxt.tensors[target]
                n = e.values.numel()
                buf = bufs.get(target)
                if buf is None or buf.numel() < n or buf.dtype != flat.dtype or buf.device != flat.device:
                    buf = torch.empty(n, dtype=flat.dtype, device=flat.device)
                if nxt.compact:
                    written = walk(e, flat, SWAP, values=e.values, saved=buf, torch_ops=self._torch_ops)
                else:
                    written, compacted[target] = walk_compacting(e, flat, SWAP, values=e.values, saved=buf,
                                                                 torch_ops=self._torch_ops)
                bufs[target] = buf  # one key per thread: dict assignment is atomic
            return restored, written

        try:
            counts = _walk_all(self.model, one, targets, self._workers, self._torch_ops)
            self._saved = {t: bufs[t][: e.values.numel()] for t, e in (nxt.tensors.items() if nxt else ())}
            if nxt is not None and not nxt.compact:
                nxt.tensors.update(compacted)
                nxt.compact = True
            self._active = nxt
        except BaseException:
            what = f"switch to {nxt.name if nxt else 'the base'!r}"
            self._broken = what
            self._active = None
            setattr(self.model, ATTR, {"store": self.store.root, "finetune": None, "failed": what})
            raise
        if nxt is None:
            if hasattr(self.model, ATTR):
                delattr(self.model, ATTR)
        else:
            setattr(self.model, ATTR, {"store": self.store.root, "finetune": nxt.name})
        return {"restored": sum(c[0] for c in counts), "entries": sum(c[1] for c in counts), "tensors": len(targets)}

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
                nxt = self._load(name, compact=False)
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
