"""Read a subnetwork back: a lazy, safe_open-like view of the fine-tune it stands for.

`open_subnetwork(store, finetune)` gives `keys()`, `metadata()`, `get_tensor(name)` and
`get_slice(name)[a:b]`: a pruned tensor is the base tensor with the kept entries overwritten by
the stored fine-tuned values (bit-exact, same dtype and shape); a whole tensor is returned as
stored. Nothing is read until asked for, one tensor at a time, and every part is checked
against the sha256 in the manifest before it is trusted. The base checkpoint is found where
the manifest says (or where `base` says, when it moved) and must be the very base the
subnetwork was pruned against: its safetensors headers must hash the same.

`materialize` (export.py) writes the dense directory; `inspect_store` reports sizes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import struct

import torch
from safetensors import safe_open

from ken_dist.errors import KenError
from ken_dist.export import materialize
from ken_dist.parts import apply_block, decode_whole, torch_dtype
from ken_dist.store import Store

__all__ = ["open_subnetwork", "Subnetwork", "materialize", "inspect_store", "base_files"]


def _header_sha256(path: str) -> tuple[int, str, list[str]]:
    """(size, sha256 of the 8 length bytes + JSON header, tensor names) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n)
    names = [k for k in json.loads(raw) if k != "__metadata__"]
    return os.path.getsize(path), hashlib.sha256(head + raw).hexdigest(), names


def base_files(location) -> tuple[str, list[dict], dict[str, str]]:
    """(root, identity file entries, {tensor name: file}) of the base checkpoint at `location`.

    Uses ken_dist.checkpoint when it imports (HF cache ids, shard indexes, header validation);
    otherwise reads a local directory or file itself with the same header hash definition."""
    try:
        from ken_dist.checkpoint import open_checkpoint
    except ImportError:
        open_checkpoint = None
    if open_checkpoint is not None:
        ckpt = open_checkpoint(location)
        return ckpt.root, ckpt.identity()["files"], {n: i.file for n, i in ckpt.tensors.items()}
    path = os.path.abspath(os.fspath(location))
    if os.path.isfile(path):
        root, files = os.path.dirname(path), [path]
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        root, files = path, [os.path.join(path, "model.safetensors")]
    else:
        root, files = path, sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise KenError(f"base checkpoint {location}: no .safetensors files found")
    entries, where = [], {}
    for p in files:
        size, sha, names = _header_sha256(p)
        entries.append({"name": os.path.relpath(p, root), "size": size, "header_sha256": sha})
        where.update(dict.fromkeys(names, p))
    return root, entries, where


class _Slice:
    """`get_slice(name)[a:b]`: reads only rows a..b of the base and the parts that cover them."""

    def __init__(self, sub: "Subnetwork", name: str):
        self._sub, self._name, self._t = sub, name, sub._entry(name)

    def get_shape(self) -> list[int]:
        return list(self._t["shape"])

    def get_dtype(self) -> str:
        return self._t["dtype"]

    def __getitem__(self, key):
        shape = self._t["shape"]
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if len(shape) < 2 or self._t["action"] != "prune" or not (
                isinstance(first, int) or (isinstance(first, slice) and first.step in (None, 1))):
            return self._sub.get_tensor(self._name)[key]
        if isinstance(first, int):
            i = first + shape[0] if first < 0 else first
            if not 0 <= i < shape[0]:
                raise IndexError(f"row {first} out of range for tensor {self._name!r} of shape {shape}")
            return self._sub._rows(self._name, i, i + 1).reshape(shape[1:])[rest]
        a, b, _ = first.indices(shape[0])
        b = max(a, b)
        return self._sub._rows(self._name, a, b).reshape([b - a, *shape[1:]])[(slice(None), *rest)]


class Subnetwork:
    """The view returned by open_subnetwork; see the module docstring."""

    def __init__(self, store, finetune: str, base=None, *, verify: bool = True):
        self.store = store if isinstance(store, Store) else Store(store)
        self.finetune = finetune
        self.verify = verify
        self._manifest = self.store.manifest(finetune)
        if not self._manifest.get("complete"):
            raise KenError(f"store {self.store.root}: fine-tune {finetune!r} is incomplete (its prune run "
                           f"was interrupted or is still running); rerun the same prune command to finish it")
        self._tensors = self._manifest["tensors"]
        self._base_where: dict[str, str] | None = None
        if any(t["action"] == "prune" for t in self._tensors.values()):
            self._open_base(base)

    def _open_base(self, base) -> None:
        ident = self._manifest["base_identity"] or {}
        location = base if base is not None else ident.get("root")
        fix = "pass base=... (--base) pointing at the base checkpoint the subnetwork was pruned against"
        if location is None or (base is None and not os.path.exists(location)):
            if base is None and ident.get("source") and ident.get("source") != location:
                location = ident["source"]  # e.g. an HF repo id, found again in the local cache
            else:
                raise KenError(f"base checkpoint not found at {location} (recorded in the manifest of "
                               f"fine-tune {self.finetune!r}); it moved or was deleted; {fix}")
        try:
            root, files, where = base_files(location)
        except KenError as e:
            raise KenError(f"cannot open the base checkpoint for fine-tune {self.finetune!r}: {e}; {fix}") from None
        have = {f["name"]: f for f in files}
        have_base = {os.path.basename(f["name"]): f for f in files}
        problems = []
        for want in ident.get("files", []):
            got = have.get(want["name"]) or have_base.get(os.path.basename(want["name"]))
            if got is None:
                problems.append(f"{want['name']} is missing")
            elif (got["size"], got["header_sha256"]) != (want["size"], want["header_sha256"]):
                problems.append(f"{want['name']} differs (size {got['size']} vs {want['size']}, header sha256 "
                                f"{got['header_sha256'][:12]}... vs {want['header_sha256'][:12]}...)")
        if problems:
            raise KenError(f"base checkpoint at {root} is not the one fine-tune {self.finetune!r} was pruned "
                           f"against: {'; '.join(problems[:5])}; {fix}")
        self._base_where = where

    # ---- safe_open-like surface --------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self) -> list[str]:
        return list(self._tensors)

    def metadata(self) -> dict[str, str]:
        """String metadata like safetensors': format, fine-tune, params and summary as JSON."""
        m = self._manifest
        return {"format": m["format"], "format_version": str(m["format_version"]), "finetune": self.finetune,
                "ken_dist_version": str(m.get("ken_dist_version")), "params": json.dumps(m["params"]),
                "summary": json.dumps(m.get("summary"))}

    def manifest(self) -> dict:
        return self._manifest

    def _entry(self, name: str) -> dict:
        try:
            return self._tensors[name]
        except KeyError:
            raise KenError(f"fine-tune {self.finetune!r} in store {self.store.root} has no tensor {name!r}; "
                           f"see keys() for the {len(self._tensors)} it holds") from None

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self._entry(name)
        if t["action"] == "whole":
            block = t["blocks"][0]
            table = self.store.read_part(block, name, verify=self.verify)
            try:
                return decode_whole(table, torch_dtype(t["dtype"]), t["shape"])
            except ValueError as e:
                raise KenError(f"part file {self.store.resolve(block['file'])} of tensor {name!r} is "
                               f"inconsistent ({e}); delete it and rerun the prune command") from None
        return self._rows(name, 0, t["rows"]).reshape(t["shape"])

    # ---- reconstruction ----------------------------------------------------------------------
    def _base_rows(self, name: str, t: dict, a: int, b: int) -> torch.Tensor:
        base_name = t["base_name"]
        path = self._base_where.get(base_name)
        if path is None:
            raise KenError(f"base checkpoint has no tensor {base_name!r} (base of {name!r}); pass the base "
                           f"checkpoint the subnetwork was pruned against")
        with safe_open(path, framework="pt") as f:
            sl = f.get_slice(base_name)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
            if dtype != t["dtype"] or math.prod(shape) != t["rows"] * t["row_len"] or (
                    len(shape) >= 2 and shape[0] != t["rows"]):
                raise KenError(f"{path}: base tensor {base_name!r} is {dtype} {shape}, but {name!r} was pruned "
                               f"as {t['dtype']} {t['shape']}; pass the right base checkpoint")
            if len(shape) >= 2 and (a, b) != (0, t["rows"]):
                rows = sl[a:b]  # reads only these rows' bytes
            else:
                rows = f.get_tensor(base_name).reshape(t["rows"], t["row_len"])[a:b]
        return rows.reshape(b - a, t["row_len"]).contiguous()

    def _rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of a pruned tensor as [b - a, row_len]: base rows + kept fine-tuned entries."""
        t = self._entry(name)
        out = self._base_rows(name, t, a, b)
        for block in t["blocks"]:
            if block["row_end"] <= a or block["row_start"] >= b:
                continue
            table = self.store.read_part(block, name, verify=self.verify)
            try:
                apply_block(table, out, block["row_start"], block["row_end"], target_row0=a)
            except ValueError as e:
                raise KenError(f"part file {self.store.resolve(block['file'])} of tensor {name!r} is "
                               f"inconsistent ({e}); delete it and rerun the prune command") from None
        return out


def open_subnetwork(store, finetune: str, base=None, *, verify: bool = True) -> Subnetwork:
    """A context manager like safetensors.safe_open over a stored fine-tune (see module doc)."""
    return Subnetwork(store, finetune, base, verify=verify)


def inspect_store(store) -> dict:
    """Per fine-tune and tensor: kept params, stored bytes, information bound and ratios.

    Read from the manifests only (no part is opened). bound_bytes is sum over rows of
    kept*itemsize + log2 C(n, kept)/8; ratio = stored / bound; vs_dense = stored / dense.
    Per fine-tune also flat fields: tensors_pruned, tensors_whole, kept_params, pruned_params,
    stored_bytes, dense_bytes, bound_ratio (pruned tensors' stored / bound; None if none)."""
    store = store if isinstance(store, Store) else Store(store)
    out = {"store": store.root, "finetunes": {}}
    for ft in store.finetunes():
        m = store.manifest(ft)
        tensors, tot = {}, {"kept": 0, "params": 0, "bytes": 0, "bound_bytes": 0.0, "dense_bytes": 0}
        done = None if m.get("complete") else store.completed_blocks(ft)
        for name, t in m["tensors"].items():
            blocks = t["blocks"] if done is None else [
                done[k] for k in ((name, b["row_start"], b["row_end"]) for b in t["blocks"]) if k in done]
            itemsize = torch.empty(0, dtype=torch_dtype(t["dtype"])).element_size()
            numel = t["rows"] * t["row_len"]
            kept = sum(b.get("kept", 0) for b in blocks)
            nbytes = sum(b.get("bytes", 0) for b in blocks)
            bound = sum(b.get("bound_bytes", 0.0) for b in blocks)
            rows_done = sum(b["row_end"] - b["row_start"] for b in blocks)
            whole = t["action"] == "whole"
            row_min = t["row_len"] if whole else min((b.get("kept_row_min", 0) for b in blocks), default=0)
            row_max = t["row_len"] if whole else max((b.get("kept_row_max", 0) for b in blocks), default=0)
            tensors[name] = {
                "action": t["action"], "dtype": t["dtype"], "shape": t["shape"], "params": numel,
                "kept": kept, "kept_fraction": kept / numel if numel else 0.0, "bytes": nbytes,
                "bound_bytes": round(bound, 1), "ratio": nbytes / bound if bound else None,
                "dense_bytes": numel * itemsize, "vs_dense": nbytes / (numel * itemsize) if numel else None,
                "kept_per_row": {"min": row_min, "mean": kept / rows_done if rows_done else 0.0, "max": row_max},
                "blocks_done": len(blocks), "blocks_planned": len(t["blocks"]),
            }
            for k, v in (("kept", kept), ("params", numel), ("bytes", nbytes), ("bound_bytes", bound),
                         ("dense_bytes", numel * itemsize)):
                tot[k] += v
        pruned = [t for t in tensors.values() if t["action"] == "prune"]
        p_bytes, p_bound = sum(t["bytes"] for t in pruned), sum(t["bound_bytes"] for t in pruned)
        tot["ratio"] = tot["bytes"] / tot["bound_bytes"] if tot["bound_bytes"] else None
        tot["vs_dense"] = tot["bytes"] / tot["dense_bytes"] if tot["dense_bytes"] else None
        tot["bound_bytes"] = round(tot["bound_bytes"], 1)
        out["finetunes"][ft] = {"complete": bool(m.get("complete")), "params": m["params"],
                                "created": m.get("created"), "updated": m.get("updated"),
                                "totals": tot, "tensors": tensors,
                                # flat summary fields (the CLI prints these)
                                "tensors_pruned": len(pruned), "tensors_whole": len(tensors) - len(pruned),
                                "kept_params": sum(t["kept"] for t in pruned),
                                "pruned_params": sum(t["params"] for t in pruned),
                                "stored_bytes": tot["bytes"], "dense_bytes": tot["dense_bytes"],
                                "bound_ratio": p_bytes / p_bound if p_bound else None}
    return out
