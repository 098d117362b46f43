"""Pair fine-tune tensors with base tensors and decide, per tensor, prune or store whole.

Why a separate, early step: a fine-tune saved under another wrapper (`bert.` vs none), of
another size, or in another dtype would otherwise fail hours into a job, or worse, succeed
with nonsense. Everything is checked from headers alone, and every problem is reported in
ONE KenError (first 20 listed, plus a count), with the option that fixes it, so the user
fixes the whole invocation at once.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ken_dist.errors import KenError

if TYPE_CHECKING:
    from ken_dist.checkpoints.inventory import Checkpoint

MAX_LISTED = 20

# Presets choose which fine-tune tensors are pruned (re.search on the fine-tune name; any one
# pattern selects). "attention-only" follows the KEN paper, which pruned attention layers:
# the q/k/v/output projection weights under the naming schemes of common families.
PRESETS: dict[str, tuple[str, ...]] = {
    "all": (),
    "attention-only": (
        r"(?:^|\.)(?:q|k|v|o|qkv)_proj\.weight$",  # Llama, Mistral, Qwen, Gemma, OPT, Phi-3
        r"attn\.(?:\w+_proj(?:_with_mqa)?|c_attn|c_proj|dense)\.weight$",  # GPT-2, BART, Phi, MLA
        r"attention\.(?:self\.(?:query|key|value)|output\.dense|dense|query_key_value"
        r"|out_proj|[qkv]_lin|out_lin)\.weight$",  # BERT/RoBERTa, GPT-NeoX, Falcon, DistilBERT
        r"(?:SelfAttention|EncDecAttention)\.[qkvo]\.weight$",  # T5
        r"(?:^|\.)(?:query_key_value|Wqkv|W_pack)\.weight$",  # BLOOM, MPT, Baichuan
    ),
}


@dataclass(frozen=True)
class TensorMatch:
    name: str  # fine-tune tensor name (the name stored and materialized)
    base_name: str | None  # matching base tensor name; None when only in the fine-tune
    action: str  # "prune" or "whole"
    reason: str  # why whole: "only in fine-tune", "not a float tensor", "scalar", "empty",
    # "excluded"; "" when pruned


def parse_prefix_map(items) -> dict[str, str]:
    """CLI form ["bert.=", "model.=base."] (FINETUNE_PREFIX=BASE_PREFIX) -> dict; a dict passes."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in [items] if isinstance(items, str) else items:
        if not isinstance(item, str) or "=" not in item:
            raise KenError(f"--map-prefix {item!r}: expected FINETUNE_PREFIX=BASE_PREFIX, e.g. "
                           f"'bert.=' to drop a 'bert.' prefix from fine-tune names")
        ft, base = item.split("=", 1)
        out[ft] = base
    return out


def _compile(kind: str, patterns, problems: list[str]) -> list[re.Pattern]:
    if patterns is None:
        return []
    out = []
    for p in [patterns] if isinstance(patterns, str) else patterns:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as e:
            problems.append(f"invalid {kind} regex {p!r}: {e}; fix the pattern (Python re syntax)")
    return out


def _map_name(name: str, prefix_map: dict[str, str]) -> str:
    for ft in sorted(prefix_map, key=len, reverse=True):
        if name.startswith(ft):
            return prefix_map[ft] + name[len(ft):]
    return name


def match_checkpoints(base: Checkpoint, finetune: Checkpoint, *, include=None, exclude=None,
                      preset=None, prefix_map=None, ignore_missing=None) -> list[TensorMatch]:
    """Match every fine-tune tensor to the base (after prefix_map) and choose its action.

    include/exclude: regexes (re.search on the fine-tune name) narrowing what is pruned; a
    preset ("attention-only", "all") narrows further. Float tensors not selected are stored
    whole with reason "excluded". ignore_missing: regexes on base names the fine-tune may
    lack (e.g. a pre-training head replaced by a classifier); any other base tensor missing
    from the fine-tune is an error. Returns one TensorMatch per fine-tune tensor, in order."""
    problems: list[str] = []
    inc = _compile("include", include, problems)
    exc = _compile("exclude", exclude, problems)
    ign = _compile("ignore-missing", ignore_missing, problems)
    pre: list[re.Pattern] = []
    if preset is not None:
        if preset not in PRESETS:
            problems.append(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        else:
            pre = [re.compile(p) for p in PRESETS[preset]]
    try:
        pmap = parse_prefix_map(prefix_map)
    except KenError as e:
        problems.append(str(e))
        pmap = {}

    matches: list[TensorMatch] = []
    claimed: dict[str, str] = {}  # base name -> fine-tune name
    ft_only: list[str] = []
    mismatch: list[str] = []
    dtype_bad = False
    for name, info in finetune.tensors.items():
        bname = _map_name(name, pmap)
        binfo = base.tensors.get(bname)
        if binfo is None:
            ft_only.append(name)
            matches.append(TensorMatch(name, None, "whole", "only in fine-tune"))
            continue
        if bname in claimed:
            problems.append(f"fine-tune tensors {claimed[bname]!r} and {name!r} both map to base "
                            f"{bname!r}; fix --map-prefix")
        claimed[bname] = name
        shown = repr(name) if bname == name else f"{name!r} (base {bname!r})"
        if info.shape != binfo.shape:
            mismatch.append(f"shape mismatch: {shown} is {list(info.shape)} in the fine-tune "
                            f"but {list(binfo.shape)} in the base; check that both are the same "
                            f"architecture and size (config.json)")
        if info.dtype != binfo.dtype:
            dtype_bad = True
            mismatch.append(f"dtype mismatch: {shown} is {info.dtype} in the fine-tune but "
                            f"{binfo.dtype} in the base")
        matches.append(_decide(name, bname, info, inc, exc, pre))

    missing = [n for n in base.tensors if n not in claimed and not any(p.search(n) for p in ign)]
    problems += [f"missing in fine-tune: {n!r} (base {base.tensors[n].dtype} "
                 f"{list(base.tensors[n].shape)})" for n in missing]
    problems += mismatch
    if (inc or exc or pre) and not any(m.action == "prune" for m in matches):
        floats = sum(1 for m in matches if m.reason == "excluded")
        problems.append(f"the selection (include={include!r}, exclude={exclude!r}, "
                        f"preset={preset!r}) leaves none of the {floats} float tensors to "
                        f"prune; check the patterns against the tensor names")
    if problems:
        raise KenError(_message(base, finetune, problems, ft_only, missing, dtype_bad))
    return matches


def _decide(name, bname, info, inc, exc, pre) -> TensorMatch:
    if not info.is_float:
        return TensorMatch(name, bname, "whole", "not a float tensor")
    if len(info.shape) == 0:
        return TensorMatch(name, bname, "whole", "scalar")
    if 0 in info.shape:
        return TensorMatch(name, bname, "whole", "empty")
    chosen = ((not pre or any(p.search(name) for p in pre))
              and (not inc or any(p.search(name) for p in inc))
              and not any(p.search(name) for p in exc))
    if not chosen:
        return TensorMatch(name, bname, "whole", "excluded")
    return TensorMatch(name, bname, "prune", "")


def _message(base, finetune, problems, ft_only, missing, dtype_bad) -> str:
    lines = [f"fine-tune {finetune.source!r} does not match base {base.source!r}: "
             f"{len(problems)} problem(s)"]
    lines += [f"  - {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    guess = guess_prefix(ft_only, missing)
    explained = 0
    if guess:
        ft_pre, base_pre, explained = guess
        lines.append(f"Fix: names differ by a prefix ({explained} of {len(missing)} missing "
                     f"tensors are fine-tune tensors named {ft_pre!r}+name vs base "
                     f"{base_pre!r}+name): use --map-prefix '{ft_pre}={base_pre}' "
                     f"(prefix_map={{{ft_pre!r}: {base_pre!r}}})")
    if missing and explained < len(missing):
        heads = {n.split(".", 1)[0] for n in missing}
        regex = f"'^{re.escape(heads.pop())}\\.'" if len(heads) == 1 else "REGEX"
        lines.append(f"Fix: if the fine-tune dropped those base tensors on purpose (e.g. a "
                     f"pre-training head replaced by a classifier), skip them with "
                     f"--ignore-missing {regex} (ignore_missing=[...]); otherwise check that "
                     f"the base is the model this fine-tune was trained from")
    if dtype_bad:
        lines.append("Fix: re-save one checkpoint in the other's dtype (e.g. "
                     "model.to(torch.bfloat16).save_pretrained(...)) so values compare exactly")
    return "\n".join(lines)


def guess_prefix(ft_only, missing, depth: int = 3) -> tuple[str, str, int] | None:
    """The (fine-tune prefix, base prefix) pair that explains most missing base names.

    A pair counts when ft_prefix + rest is a fine-tune-only name and base_prefix + rest a
    missing base name, for prefixes of up to `depth` dotted components and rests of at least
    two components (so 'x.weight' vs 'y.weight' is not taken for a prefix)."""
    def splits(name):
        parts = name.split(".")
        for i in range(0, min(depth, len(parts) - 2) + 1):
            yield (".".join(parts[:i]) + "." if i else ""), ".".join(parts[i:])

    by_rest = defaultdict(set)
    for b in missing:
        for pre, rest in splits(b):
            by_rest[rest].add(pre)
    counts: Counter = Counter()
    for f in ft_only:
        pairs = {(fp, bp) for fp, rest in splits(f) for bp in by_rest.get(rest, ()) if fp != bp}
        counts.update(pairs)
    if not counts:
        return None
    (fp, bp), n = min(counts.items(), key=lambda kv: (-kv[1], len(kv[0][0]) + len(kv[0][1]),
                                                       kv[0]))
    if n < 2 and n < len(missing):
        return None
    return fp, bp, n
