"""Which model tensor each stored tensor goes to, and what a model records about the fine-tune it holds.

Shared by inject.py (apply, swap) and switcher.py (Switcher): both write stored entries into a
live model's own parameters, so both need the same name resolution, the same checks on the
target tensor, and the same record on the model (`model.ken_subnetwork`).

Names: stored names are the fine-tune checkpoint's. A model may name them differently: the
model class may add or lack its `base_model_prefix` (`bert.` in BertForSequenceClassification,
none in BertModel), the manifest records each pruned tensor's base name (what --map-prefix
mapped it to), and `name_map` (dict or callable) handles anything else. Tied weights (one tensor
under two names) are written once, through the name `named_parameters()` reports.
"""
from __future__ import annotations

import re
import warnings

import torch

from ken_dist.errors import InputError, KenError, StoreError
from ken_dist.subnetwork.view import Subnetwork

__all__ = ["ATTR", "resolve_names", "candidate_names", "model_tensors", "flat_target", "expect_holds", "same_base"]

ATTR = "ken_subnetwork"  # set on the model: {"store", "finetune"} of the fine-tune it now holds


def model_tensors(model) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
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


def candidate_names(name: str, entry: dict, prefix: str):
    """The model names a stored tensor may have, in the order resolve_names tries them."""
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
    tensors, canonical = model_tensors(model)
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
            cands = candidate_names(name, entry, prefix)
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


def flat_target(model_name: str, t: torch.Tensor, entry: dict, stored: str, finetune: str) -> torch.Tensor:
    """The model tensor as a flat view (writes land in the parameter), after checking it can take
    the stored tensor: materialized, same number of entries, floating point, contiguous."""
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
    return t.data.view(-1)


def expect_holds(model, expected: str | None, to: str) -> None:
    """Refuse a model that ken_dist knows holds another fine-tune (or a half-finished write).
    expected None: the model must hold the base (or carry no record)."""
    held = getattr(model, ATTR, None)
    if not held or held.get("finetune") == expected:
        return
    if held.get("finetune") is None:
        raise KenError(f"the model is in an unknown state: {held.get('failed')} stopped half way; load it "
                       f"again (load_model)")
    fix = ("it already holds the target" if held["finetune"] == to else
           f"call swap(model, store, {held['finetune']!r}, {to!r})")
    raise InputError(f"the model holds fine-tune {held['finetune']!r} (store {held['store']}), not "
                     f"{expected if expected is not None else 'the base'!r}; {fix}")


def same_base(a: Subnetwork, b: str) -> None:
    """Fine-tunes a and b (of a's store) may share one live model only if they were pruned
    against the same base; checked on the manifests, before b's view opens the base."""
    def files(manifest):
        return sorted((f["size"], f["header_sha256"], f.get("sample_sha256"))
                      for f in (manifest.get("base_identity") or {}).get("files") or [])
    if files(a.manifest()) != files(a.store.manifest(b)):
        raise StoreError(f"fine-tunes {a.finetune!r} and {b!r} were pruned against different base "
                         f"checkpoints (their manifests' base_identity files differ); a model can only be swapped "
                         f"between fine-tunes of one base: load_model(store, {b!r}) instead")
