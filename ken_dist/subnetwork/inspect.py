"""`inspect_store`: what a store holds, per fine-tune and tensor, from the manifests alone.

Why manifests only: inspecting a store of many 70B fine-tunes must not open a part file; every
figure (kept entries, stored bytes, the information bound) was recorded when the block was
committed.
"""
from __future__ import annotations

from ken_dist.checkpoints.dtypes import itemsize
from ken_dist.errors import KenError
from ken_dist.store.protocol import MARKER_VERSION, Store


def inspect_store(store) -> dict:
    """Per fine-tune and tensor: kept params, stored bytes, information bound and ratios.

    Read from the manifests only (no part is opened). bound_bytes is sum over rows of
    kept*itemsize + log2 C(n, kept)/8; ratio = stored / bound; vs_dense = stored / dense.
    Per fine-tune also flat fields: format_version (of its manifest), values (its value codec),
    tensors_pruned, tensors_whole, kept_params, pruned_params, stored_bytes, dense_bytes,
    bound_ratio (pruned tensors' stored / bound; None if none), manifest_bytes and
    bits_per_param: 8 x (every part file + the manifest) / the fine-tune's parameter count.
    A fine-tune whose manifest or journal cannot be read is reported as {"error": message},
    so one damaged fine-tune does not hide the others."""
    store = store if isinstance(store, Store) else Store(store)
    out = {"store": store.root, "format_version": MARKER_VERSION, "finetunes": {}}
    for ft in store.finetunes():
        try:
            out["finetunes"][ft] = _inspect_finetune(store, ft)
        except KenError as exc:
            out["finetunes"][ft] = {"error": str(exc)}
    return out


def _inspect_finetune(store: Store, ft: str) -> dict:
    """inspect_store's report of one fine-tune (KenError when its files cannot be read)."""
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
    manifest_bytes = store.manifest_size(ft)
    return {"complete": bool(m.get("complete")), "params": m["params"],
            "format_version": m["format_version"], "values": m["params"].get("values", "raw"),
            "manifest_bytes": manifest_bytes,
            "bits_per_param": 8 * (tot["bytes"] + manifest_bytes) / tot["params"] if tot["params"] else None,
            "created": m.get("created"), "updated": m.get("updated"),
            "scale_fits": m.get("scale_fits", []),
            "totals": tot, "tensors": tensors,
            # flat summary fields (the CLI prints these)
            "tensors_pruned": len(pruned), "tensors_whole": len(tensors) - len(pruned),
            "kept_params": sum(t["kept"] for t in pruned),
            "pruned_params": sum(t["params"] for t in pruned),
            "stored_bytes": tot["bytes"], "dense_bytes": tot["dense_bytes"],
            "bound_ratio": p_bytes / p_bound if p_bound else None}
