"""Check a stored manifest's structure before anything is rebuilt from it.

Why: every reader (the lazy view, materialize, inject, inspect, KENviz) indexes the manifest's
fields directly. A damaged or hand-edited manifest (a shape that disagrees with its rows, blocks
that overlap or leave a gap, a size that is a string) would otherwise end in a KeyError or
TypeError traceback, or worse, in a tensor reshaped to the wrong shape. One pass here turns each
such defect into a StoreError naming the file and the field. Fields this reader does not know
are ignored (docs/format.md: additive fields do not change the format).
"""
from __future__ import annotations

import math

from ken_dist.checkpoints.geometry import row_geometry
from ken_dist.checkpoints.header import DTYPE_BITS
from ken_dist.errors import StoreError

_FIX = ("the manifest is damaged or was edited; restore it, or prune this fine-tune again with --overwrite")


class _Bad(Exception):
    """(field, problem): turned into one StoreError by check_manifest."""


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _need(ok: bool, field: str, what: str) -> None:
    if not ok:
        raise _Bad(field, what)


def _identity(field: str, ident) -> None:
    _need(isinstance(ident, dict), field, "is not a JSON object")
    _need(isinstance(ident.get("root"), str), f"{field}.root", "is not a path (where the checkpoint was)")
    for key in ("source", "revision"):
        _need(ident.get(key) is None or isinstance(ident.get(key), str), f"{field}.{key}", "is not a string")
    files = ident.get("files")
    if files is None:
        return
    _need(isinstance(files, list), f"{field}.files", "is not a list")
    for i, f in enumerate(files):
        where = f"{field}.files[{i}]"
        _need(isinstance(f, dict), where, "is not a JSON object")
        _need(isinstance(f.get("name"), str), f"{where}.name", "is not a string")
        _need(_is_int(f.get("size")), f"{where}.size", "is not a non-negative integer")
        _need(isinstance(f.get("header_sha256"), str), f"{where}.header_sha256", "is not a string")
        _need(f.get("sample_sha256") is None or isinstance(f["sample_sha256"], str), f"{where}.sample_sha256",
              "is not a string")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def bad_record_field(rec: dict) -> str | None:
    """The first field of a committed block record (journal line or manifest block) that is
    missing or of the wrong type, or None; optional fields are checked when present."""
    checks = {"file": lambda v: isinstance(v, str) and v != "", "bytes": _is_int, "sha256": lambda v: isinstance(v, str),
              "kept": _is_int}
    for key, ok in checks.items():
        if not ok(rec.get(key)):
            return key
    optional = {"kept_row_min": _is_int, "kept_row_max": _is_int, "budget": _is_int, "bound_bytes": _is_number}
    return next((key for key, ok in optional.items() if key in rec and not ok(rec[key])), None)


def _blocks(where: str, t: dict, complete: bool) -> None:
    blocks = t.get("blocks")
    _need(isinstance(blocks, list), f"{where}.blocks", "is not a list")
    rows, edge = t["rows"], 0
    for i, b in enumerate(blocks):
        bw = f"{where}.blocks[{i}]"
        _need(isinstance(b, dict), bw, "is not a JSON object")
        a, e = b.get("row_start"), b.get("row_end")
        _need(_is_int(a) and _is_int(e), bw, f"row_start/row_end {a!r}/{e!r} are not non-negative integers")
        _need(a == edge and e > a, bw, f"rows [{a}, {e}) do not continue the blocks before it at row {edge} "
                                       f"(blocks must tile [0, {rows}) in order, without gaps or overlaps)")
        edge = e
        _need("budget" not in b or _is_int(b["budget"]), f"{bw}.budget", "is not a non-negative integer")
        if complete:
            bad = bad_record_field(b)
            _need(bad is None, f"{bw}.{bad}", "is missing or of the wrong type")
    _need(edge == rows and (t["action"] == "prune" or len(blocks) == 1), f"{where}.blocks",
          f"end at row {edge}, but the tensor has {rows} rows" if edge != rows else "of a whole tensor are not "
          "one block")


def _tensor(name: str, t, complete: bool) -> None:
    where = f"tensors[{name!r}]"
    _need(isinstance(t, dict), where, "is not a JSON object")
    shape = t.get("shape")
    _need(isinstance(shape, list) and all(_is_int(d) for d in shape), f"{where}.shape",
          f"{shape!r} is not a list of non-negative integers")
    dtype = t.get("dtype")
    _need(isinstance(dtype, str) and dtype in DTYPE_BITS and DTYPE_BITS[dtype] % 8 == 0, f"{where}.dtype",
          f"{dtype!r} is not a safetensors dtype")
    _need(t.get("action") in ("prune", "whole"), f"{where}.action", f"{t.get('action')!r} is not 'prune' or 'whole'")
    rows, row_len = t.get("rows"), t.get("row_len")
    _need(_is_int(rows) and _is_int(row_len) and (rows, row_len) == row_geometry(shape), f"{where}.rows",
          f"rows {rows!r} x row_len {row_len!r} is not the row geometry {row_geometry(shape)} of shape {shape}")
    if t["action"] == "prune":
        _need(isinstance(t.get("base_name"), str), f"{where}.base_name", "is not a tensor name")
    _blocks(where, t, complete)


def check_manifest(manifest: dict, path: str, finetune: str) -> None:
    """Raise StoreError naming `path` and the field when the manifest cannot be read safely."""
    try:
        _need(manifest.get("finetune") == finetune, "finetune",
              f"{manifest.get('finetune')!r} is not the fine-tune {finetune!r} whose directory holds it")
        _need(isinstance(manifest.get("complete"), bool), "complete", "is not true or false")
        _need(isinstance(manifest.get("params"), dict), "params", "is not a JSON object")
        for key in ("base_identity", "finetune_identity"):
            _identity(key, manifest.get(key))
        tensors = manifest.get("tensors")
        _need(isinstance(tensors, dict), "tensors", "is not a JSON object")
        for name, t in tensors.items():
            _tensor(name, t, manifest["complete"])
    except _Bad as bad:
        field, what = bad.args
        raise StoreError(f"{path}: field `{field}` {what}; {_FIX}") from None
