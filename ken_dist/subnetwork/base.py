"""The base checkpoint of a stored fine-tune: found where the manifest says (or where the user
says it moved) and checked to be the very base the subnetwork was pruned against.

Why so strict: a subnetwork rebuilt on another base is silently wrong weights. Two checkpoints of
one architecture (a base and its instruct tune) have equal headers, so besides file sizes and
header sha256 the check compares a sample of the tensor bytes (`sample_sha256`) when the manifest
recorded one. This is the one implementation: the lazy view, materialize, injection and KENviz
all reach the base through `open_verified_base`.
"""
from __future__ import annotations

import os
import re

from ken_dist.checkpoints.inventory import Checkpoint, open_checkpoint
from ken_dist.errors import CheckpointError, KenError

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")  # "org/name[@revision]", never a local path
_FIX = "pass base=... (--base) pointing at the base checkpoint the subnetwork was pruned against"


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


def locate_base(manifest: dict, base, finetune: str) -> Checkpoint:
    """Open the base: `base` as given (path, .safetensors file, HF repo id[@revision] or a
    Checkpoint), else the recorded root, else the recorded HF repo id at its revision."""
    ident = manifest.get("base_identity") or {}
    if isinstance(base, Checkpoint):
        return base
    if base is not None:
        try:
            return open_checkpoint(base)
        except KenError as e:
            raise CheckpointError(f"cannot open the base checkpoint {base!r} for fine-tune {finetune!r}: "
                                  f"{e}; {_FIX}") from None
    root, source, files = ident.get("root"), ident.get("source"), ident.get("files") or []
    if root and os.path.isdir(root):
        single = os.path.join(root, files[0]["name"]) if len(files) == 1 else None
        return open_checkpoint(single if single and os.path.isfile(single) else root)
    if source and not os.path.exists(source) and _REPO_ID.fullmatch(source):
        rev = None if "@" in source else ident.get("revision")
        try:
            return open_checkpoint(source, rev)
        except KenError as e:
            raise CheckpointError(f"base checkpoint {source!r} (recorded in the manifest of fine-tune "
                                  f"{finetune!r}) cannot be found: {e}; or {_FIX}") from None
    raise CheckpointError(f"base checkpoint not found at {root} (recorded in the manifest of fine-tune "
                          f"{finetune!r}); it moved or was deleted; {_FIX}")


def verify_base(ckpt: Checkpoint, manifest: dict, finetune: str) -> Checkpoint:
    """`ckpt` if it is the base `manifest` was pruned against: file sizes, header sha256 and (stores
    written since it was recorded) a sample of the tensor bytes; every pruned tensor's base must
    exist with its dtype and row geometry. Else a CheckpointError listing what differs."""
    problems = []
    for want, got in _pair_files((manifest.get("base_identity") or {}).get("files") or [],
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
    for name, t in manifest["tensors"].items():
        if t["action"] != "prune" or len(problems) > 5:
            continue
        info = ckpt.tensors.get(t["base_name"])
        if info is None:
            problems.append(f"it has no tensor {t['base_name']!r} (base of {name!r})")
        elif info.dtype != t["dtype"] or list(info.shape) != list(t["shape"]):  # shape, not just rows
            problems.append(f"base tensor {t['base_name']!r} is {info.dtype} {list(info.shape)}, but {name!r} "
                            f"was pruned as {t['dtype']} {t['shape']}")
    if problems:
        raise CheckpointError(f"base checkpoint at {ckpt.root} is not the one fine-tune {finetune!r} was pruned "
                              f"against: {'; '.join(problems[:5])}; {_FIX}")
    return ckpt


def open_verified_base(manifest: dict, base, finetune: str) -> Checkpoint:
    """locate_base, then verify_base."""
    return verify_base(locate_base(manifest, base, finetune), manifest, finetune)
