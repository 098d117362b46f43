"""Read a subnetwork back: a lazy, safe_open-like view of the fine-tune it stands for.

`open_subnetwork(store, finetune)` gives `keys()`, `metadata()`, `get_tensor(name)` and
`get_slice(name)[a:b]`: a pruned tensor is the base tensor with the kept entries overwritten by
the stored fine-tuned values (bit-exact, same dtype and shape); a whole tensor is returned as
stored. Nothing is read until asked for, one tensor at a time, and every part is checked
against the sha256 in the manifest before it is trusted. The base checkpoint is found where
the manifest says (or where `base` says, when it moved: a directory, a .safetensors file or an
HF repo id in the local cache) and must be the very base the subnetwork was pruned against: its
safetensors headers and a sample of its tensor bytes must hash the same, or a KenError says so.
`get_slice(name)[a:b]` reads only the part files whose row blocks overlap a..b and only rows a..b
of the base (safetensors slices of a memory map): a row of a 70B model costs kilobytes.

`rows`, `base_rows` and `kept` are the row-level access inject.py builds on (load_model,
apply, swap write kept entries into a live model instead of building dense tensors).

`materialize` (export.py) writes the dense directory; `inspect_store` reports sizes.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ken_dist.checkpoint import Checkpoint, open_checkpoint, read_rows
from ken_dist.errors import KenError
from ken_dist.export import materialize
from ken_dist.dtypes import itemsize, torch_dtype
from ken_dist.parts import block_rows, decode_whole, put_kept
from ken_dist.store import FORMAT_VERSION, Store

__all__ = ["open_subnetwork", "Subnetwork", "materialize", "inspect_store", "base_files"]


def base_files(location) -> tuple[str, list[dict], dict[str, str]]:
    """(root, identity file entries, {tensor name: file}) of the checkpoint at `location`
    (a directory, a .safetensors file or an HF repo id resolved offline from the local cache)."""
    ckpt = open_checkpoint(location)
    return ckpt.root, ckpt.identity()["files"], {n: i.file for n, i in ckpt.tensors.items()}


def _pair_files(want: list[dict], have: list[dict]) -> list[tuple[dict, dict | None]]:
    """Pair the manifest's files with the given checkpoint's: by name, by base name, by content
    (a moved and renamed single file), or one-to-one when both hold exactly one file."""
    by_name = {f["name"]: f for f in have}
    by_base = {os.path.basename(f["name"]): f for f in have}
    by_content = {(f["size"], f["header_sha256"]): f for f in have}
    pairs = []
    for w in want:
        got = by_name.get(w["name"]) or by_base.get(os.path.basename(w["name"])) or by_content.get(
            (w["size"], w["header_sha256"]))
        if got is None and len(want) == 1 and len(have) == 1:
            got = have[0]
        pairs.append((w, got))
    return pairs


_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")  # "org/name[@revision]", never a local path


class _Slice:
    """`get_slice(name)[a:b]`: reads only rows a..b of the base and the parts that cover them."""

    def __init__(self, sub: "Subnetwork", name: str):
        self._sub, self._name, self._t = sub, name, sub.entry(name)

    def get_shape(self) -> list[int]:
        return list(self._t["shape"])

    def get_dtype(self) -> str:
        return self._t["dtype"]

    def __getitem__(self, key):
        shape = self._t["shape"]
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if len(shape) < 2 or self._t["action"] != "prune" or not (
                isinstance(first, int) or (isinstance(first, slice) and first.step in (None, 1))):
            return self._sub.get_tensor(self._name)[key]
        if isinstance(first, int):
            i = first + shape[0] if first < 0 else first
            if not 0 <= i < shape[0]:
                raise IndexError(f"row {first} out of range for tensor {self._name!r} of shape {shape}")
            return self._sub.rows(self._name, i, i + 1).reshape(shape[1:])[rest]
        a, b, _ = first.indices(shape[0])
        b = max(a, b)
        return self._sub.rows(self._name, a, b).reshape([b - a, *shape[1:]])[(slice(None), *rest)]


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
        self._base_arg = base
        self._base: Checkpoint | None = None
        if any(t["action"] == "prune" for t in self._tensors.values()):
            _ = self.base_checkpoint  # fail now, not at the first tensor, when the base is wrong

    # ---- the base checkpoint -----------------------------------------------------------------
    _FIX = "pass base=... (--base) pointing at the base checkpoint the subnetwork was pruned against"

    def _locate_base(self) -> Checkpoint:
        """Open the base: `base` as given (path, .safetensors file, HF repo id[@revision] or a
        Checkpoint), else the recorded root, else the recorded HF repo id at its revision."""
        base, ident = self._base_arg, self._manifest.get("base_identity") or {}
        if isinstance(base, Checkpoint):
            return base
        if base is not None:
            try:
                return open_checkpoint(base)
            except KenError as e:
                raise KenError(f"cannot open the base checkpoint {base!r} for fine-tune {self.finetune!r}: "
                               f"{e}; {self._FIX}") from None
        root, source, files = ident.get("root"), ident.get("source"), ident.get("files") or []
        if root and os.path.isdir(root):
            single = os.path.join(root, files[0]["name"]) if len(files) == 1 else None
            return open_checkpoint(single if single and os.path.isfile(single) else root)
        if source and not os.path.exists(source) and _REPO_ID.fullmatch(source):
            rev = None if "@" in source else ident.get("revision")
            try:
                return open_checkpoint(source, rev)
            except KenError as e:
                raise KenError(f"base checkpoint {source!r} (recorded in the manifest of fine-tune "
                               f"{self.finetune!r}) cannot be found: {e}; or {self._FIX}") from None
        raise KenError(f"base checkpoint not found at {root} (recorded in the manifest of fine-tune "
                       f"{self.finetune!r}); it moved or was deleted; {self._FIX}")

    @property
    def base_checkpoint(self) -> Checkpoint:
        """The base, opened on first use and checked against the manifest: file sizes, header
        sha256 and (stores written since it was recorded) a sample of the tensor bytes; every
        pruned tensor's base must exist with its dtype and row geometry."""
        if self._base is not None:
            return self._base
        ckpt = self._locate_base()
        problems = []
        for want, got in _pair_files((self._manifest.get("base_identity") or {}).get("files") or [],
                                     ckpt.identity()["files"]):
            if got is None:
                problems.append(f"{want['name']} is missing")
            elif (got["size"], got["header_sha256"]) != (want["size"], want["header_sha256"]):
                problems.append(f"{got['name']} differs (size {got['size']} vs {want['size']}, header sha256 "
                                f"{got['header_sha256'][:12]}... vs {want['header_sha256'][:12]}...)")
            elif want.get("sample_sha256") and got["sample_sha256"] != want["sample_sha256"]:
                problems.append(f"{got['name']} has the same header but other tensor bytes (sample sha256 "
                                f"{got['sample_sha256'][:12]}... vs {want['sample_sha256'][:12]}...): another "
                                f"checkpoint of the same architecture")
        for name, t in self._tensors.items():
            if t["action"] != "prune" or len(problems) > 5:
                continue
            info = ckpt.tensors.get(t["base_name"])
            if info is None:
                problems.append(f"it has no tensor {t['base_name']!r} (base of {name!r})")
            elif info.dtype != t["dtype"] or tuple(info.row_geometry) != (t["rows"], t["row_len"]):
                problems.append(f"base tensor {t['base_name']!r} is {info.dtype} {list(info.shape)}, but {name!r} "
                                f"was pruned as {t['dtype']} {t['shape']}")
        if problems:
            raise KenError(f"base checkpoint at {ckpt.root} is not the one fine-tune {self.finetune!r} was pruned "
                           f"against: {'; '.join(problems[:5])}; {self._FIX}")
        self._base = ckpt
        return ckpt

    # ---- safe_open-like surface --------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def metadata(self) -> dict[str, str]:
        """String metadata like safetensors': format, fine-tune, params and summary as JSON."""
        m = self._manifest
        return {"format": m["format"], "format_version": str(m["format_version"]), "finetune": self.finetune,
                "ken_dist_version": str(m.get("ken_dist_version")), "params": json.dumps(m["params"]),
                "summary": json.dumps(m.get("summary"))}

    def manifest(self) -> dict:
        return self._manifest

    def entry(self, name: str) -> dict:
        """The manifest entry of a tensor (shape, dtype, action, rows, row_len, base_name, blocks)."""
        try:
            return self._tensors[name]
        except KeyError:
            raise KenError(f"fine-tune {self.finetune!r} in store {self.store.root} has no tensor {name!r}; "
                           f"see keys() for the {len(self._tensors)} it holds") from None

    _entry = entry

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.entry(name)
        if t["action"] == "whole":
            block = t["blocks"][0]
            table = self.store.read_part(block, name, verify=self.verify)
            try:
                return decode_whole(table, torch_dtype(t["dtype"]), t["shape"])
            except ValueError as e:
                raise KenError(f"part file {self.store.resolve(block['file'])} of tensor {name!r} is "
                               f"inconsistent ({e}); delete it and rerun the prune command") from None
        return self.rows(name, 0, t["rows"]).reshape(t["shape"])

    # ---- row access (also used to inject into a model, inject.py) ----------------------------
    def base_rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the base of pruned tensor `name` as [b - a, row_len]; reads only them."""
        t = self.entry(name)
        return read_rows(self.base_checkpoint.tensors[t["base_name"]], a, b)

    def kept(self, name: str, a: int = 0, b: int | None = None):
        """Yield (first_row, keep [m, row_len] bool numpy, values uint8 numpy) for the kept entries
        of rows [a, b) of a pruned tensor, reading only the parts whose blocks overlap them."""
        t = self.entry(name)
        b = t["rows"] if b is None else b
        size = itemsize(t["dtype"])
        for block in t["blocks"]:
            if block["row_end"] <= a or block["row_start"] >= b:
                continue
            table = self.store.read_part(block, name, verify=self.verify)
            try:
                yield from block_rows(table, t["row_len"], size, block["row_start"], block["row_end"], a, b)
            except ValueError as e:
                raise KenError(f"part file {self.store.resolve(block['file'])} of tensor {name!r} is "
                               f"inconsistent ({e}); delete it and rerun the prune command") from None

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of a pruned tensor as [b - a, row_len]: base rows + kept fine-tuned entries."""
        t = self.entry(name)
        if t["action"] != "prune":
            return self.get_tensor(name).reshape(t["rows"], t["row_len"])[a:b]
        out = self.base_rows(name, a, b).clone()
        for first, keep, values in self.kept(name, a, b):
            put_kept(out[first - a: first - a + keep.shape[0]], keep, values)
        return out

    _rows = rows


def open_subnetwork(store, finetune: str, base=None, *, verify: bool = True) -> Subnetwork:
    """A context manager like safetensors.safe_open over a stored fine-tune (see module doc).

    base: where the base checkpoint is now, when it moved since pruning: a directory, one
    .safetensors file, or an HF repo id ("org/name" or "org/name@revision") found in the local
    HF cache (offline). By default the manifest's root, then its repo id at its revision."""
    return Subnetwork(store, finetune, base, verify=verify)


def inspect_store(store) -> dict:
    """Per fine-tune and tensor: kept params, stored bytes, information bound and ratios.

    Read from the manifests only (no part is opened). bound_bytes is sum over rows of
    kept*itemsize + log2 C(n, kept)/8; ratio = stored / bound; vs_dense = stored / dense.
    Per fine-tune also flat fields: tensors_pruned, tensors_whole, kept_params, pruned_params,
    stored_bytes, dense_bytes, bound_ratio (pruned tensors' stored / bound; None if none)."""
    store = store if isinstance(store, Store) else Store(store)
    out = {"store": store.root, "format_version": FORMAT_VERSION, "finetunes": {}}
    for ft in store.finetunes():
        m = store.manifest(ft)
        tensors, tot = {}, {"kept": 0, "params": 0, "bytes": 0, "bound_bytes": 0.0, "dense_bytes": 0}
        done = None if m.get("complete") else store.completed_blocks(ft)
        for name, t in m["tensors"].items():
            blocks = t["blocks"] if done is None else [
                done[k] for k in ((name, b["row_start"], b["row_end"]) for b in t["blocks"]) if k in done]
            size = itemsize(t["dtype"])
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
                "dense_bytes": numel * size, "vs_dense": nbytes / (numel * size) if numel else None,
                "kept_per_row": {"min": row_min, "mean": kept / rows_done if rows_done else 0.0, "max": row_max},
                "blocks_done": len(blocks), "blocks_planned": len(t["blocks"]),
            }
            for k, v in (("kept", kept), ("params", numel), ("bytes", nbytes), ("bound_bytes", bound),
                         ("dense_bytes", numel * size)):
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
