"""Quick in-memory exploration of selection rules (no store, no Ray): mask every tensor of the
cached fine-tune with a rule, rebuild in memory, score. Used to search for a better rule; every
number reported in docs/quality.md comes from run.py, through the real pipeline.

    python benchmarks/quality/explore.py --seed 0 --keep 0.25 --rules magnitude ken-delta
    python benchmarks/quality/explore.py --rules magnitude --whole 'LayerNorm|bias'   # diagnose
    python benchmarks/quality/explore.py --rules tlowrank glowrank --keep 0.1 0.25    # budget scopes

Rules: any registered strategy; rel, dxft, growth (other per-row scores); lowrank{r}, lowrankdot{r}
(per-row top-k of |L_r| or delta*L_r, L_r the rank-r part of the tensor's delta); tmag, tlowrank{r}
(one budget per tensor); gmag, glowrank (one budget for the whole model: what the pipeline's
magnitude-model and lowrank-delta-model strategies now do, in memory); wanda-delta, twanda (|delta| x input-feature RMS measured on 300 training
sentences: data-aware diagnostics). Results are appended to cache/explore.jsonl.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ken_dist.checkpoints.geometry import row_geometry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from run import Evaluator  # noqa: E402

EXTRA_RULES = {}


def rule(name):
    def wrap(fn):
        EXTRA_RULES[name] = fn
        return fn
    return wrap


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    from ken_dist.kernel.strategies.registry import top_k_mask
    return top_k_mask(scores, k)


@rule("rel")
def _rel(ft, base, k):
    d = np.abs(ft - base)
    return topk(d / (np.abs(base) + np.abs(base).mean(axis=1, keepdims=True)), k)


@rule("dxft")
def _dxft(ft, base, k):
    return topk(np.abs(ft - base) * np.abs(ft), k)


@rule("growth")
def _growth(ft, base, k):
    d = ft - base
    return topk(np.abs(d) * (1.0 + (np.sign(d) == np.sign(base))), k)


def _lowrank(ft, base, rank):
    d = (ft - base).astype(np.float64)
    if d.shape[0] < 2 or rank >= min(d.shape):
        return d
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


for _r in (1, 4, 8, 32, 64):
    def _lr(ft, base, k, _r=_r):
        return topk(np.abs(_lowrank(ft, base, _r)), k)

    def _lrd(ft, base, k, _r=_r):
        d = (ft - base).astype(np.float64)
        return topk(d * _lowrank(ft, base, _r), k)
    EXTRA_RULES[f"lowrank{_r}"] = _lr
    EXTRA_RULES[f"lowrankdot{_r}"] = _lrd


def _tensor_topk(scores, k):
    """k * rows entries of the whole block by score (per-row counts free)."""
    flat = scores.reshape(-1)
    total = k * scores.shape[0]
    idx = np.argsort(-flat, kind="stable")[:total]
    m = np.zeros(flat.shape, bool)
    m[idx] = True
    return m.reshape(scores.shape)


@rule("tmag")
def _tmag(ft, base, k):
    return _tensor_topk(np.abs(ft.astype(np.float64) - base), k)


@rule("tlowrank")
def _tlowrank(ft, base, k):
    from ken_dist.kernel.strategies.delta import lowrank_part
    d = ft.astype(np.float64) - base
    return _tensor_topk(d * lowrank_part(d), k)


for _r in (1, 2, 8, 16, 64):
    def _tlr(ft, base, k, _r=_r):
        from ken_dist.kernel.strategies.delta import lowrank_part
        d = ft.astype(np.float64) - base
        return _tensor_topk(d * lowrank_part(d, _r), k)
    EXTRA_RULES[f"tlowrank{_r}"] = _tlr


@rule("tblend")
def _tblend(ft, base, k):
    from ken_dist.kernel.strategies.delta import lowrank_part
    d = ft.astype(np.float64) - base
    return _tensor_topk(d * (lowrank_part(d) + 0.5 * d), k)


_SCALES: dict = {}


def column_scales(seed: int) -> dict:
    """Diagnostic only (data-aware, not a weight-only rule): RMS of every Linear's input features on
    300 training sentences, run through the fine-tuned model. {weight name: [in_features]}."""
    path = common.CACHE / f"colscales-s{seed}.npz"
    if path.exists():
        return dict(np.load(path))
    from transformers import AutoTokenizer, BertForSequenceClassification
    ft_dir = common.finetune_dir(seed)
    tok = AutoTokenizer.from_pretrained(ft_dir)
    model = BertForSequenceClassification.from_pretrained(ft_dir).eval()
    tr_x, _, _, _ = common.load_split()
    acc, hooks = {}, []
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, mname=mname):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                s, c = acc.get(mname, (0.0, 0))
                acc[mname] = (s + (x ** 2).sum(0), c + x.shape[0])
            hooks.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        for b in range(0, 300, 50):
            enc = tok(tr_x[b:b + 50], truncation=True, max_length=common.MAX_LENGTH, padding=True, return_tensors="pt")
            model(**enc)
    out = {f"{k}.weight": np.sqrt((s / c).numpy()) for k, (s, c) in acc.items()}
    np.savez(path, **out)
    return out


def masks_for(name: str, ft: np.ndarray, base: np.ndarray, k: int, seed: int, tensor: str = "") -> np.ndarray:
    from ken_dist import select
    if name == "wanda-delta":  # diagnostic upper bound: |delta| x input-feature RMS (needs data)
        sc = column_scales(seed).get(tensor)
        if sc is not None and sc.shape[0] == ft.shape[1]:
            return topk(np.abs(ft - base) * sc[None, :], k)
        name = "magnitude"
    if name == "twanda":
        sc = column_scales(seed).get(tensor)
        d = np.abs(ft - base)
        return _tensor_topk(d * sc[None, :] if sc is not None and sc.shape[0] == ft.shape[1] else d, k)
    if name in EXTRA_RULES:
        return EXTRA_RULES[name](ft, base, k)
    return select(name, ft, base, k=k, seed=seed).numpy()


def global_state(kind: str, keep: float, seed: int) -> dict:
    """ONE budget (keep x all pruned entries) over the whole model, in memory, entries ranked by
    `magnitude-model`'s score ('gmag') or `lowrank-delta-model`'s ('glowrank'), raw values
    (recipes.py's Prepared, which also searches allocations and value codecs)."""
    from recipes import Candidate, Prepared

    prep = Prepared(seed, "magnitude-model" if kind == "gmag" else "lowrank-delta-model")
    return prep.apply(Candidate(keep, "raw"))[0]


def pruned_state(rule_name: str, keep: float, seed: int, whole: str | None, only: str | None) -> dict:
    from safetensors.torch import load_file

    ft = load_file(str(common.finetune_dir(seed) / "model.safetensors"))
    base = load_file(str(common.base_model_dir() / "model.safetensors"))
    out = {}
    wx = re.compile(whole) if whole else None
    ox = re.compile(only) if only else None
    for name, f in ft.items():
        b = base.get(name[len("bert."):]) if name.startswith("bert.") else None
        if b is None or not f.is_floating_point() or (wx and wx.search(name)) or (ox and not ox.search(name)):
            out[name] = f
            continue
        rows, _ = row_geometry(f.shape)
        f2 = f.reshape(rows, -1).float().numpy()
        b2 = b.reshape(rows, -1).float().numpy()
        k = max(1, round(keep * f2.shape[1]))
        m = masks_for(rule_name, f2, b2, k, seed, name)
        if not rule_name.startswith("t"):
            assert (m.sum(axis=1) == min(k, f2.shape[1])).all(), name
        else:
            assert m.sum() == min(k, f2.shape[1]) * f2.shape[0], name
        out[name] = torch.from_numpy(np.where(m, f2, b2)).reshape(f.shape).to(f.dtype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.25])
    ap.add_argument("--rules", nargs="+", default=["magnitude"])
    ap.add_argument("--whole", default=None, help="regex: tensors left at their fine-tuned value (not pruned)")
    ap.add_argument("--only", default=None, help="regex: prune only these tensors")
    args = ap.parse_args(argv)
    import ken_dist.kernel  # noqa: F401  (registers every strategy)
    ev = Evaluator(common.finetune_dir(args.seed))
    for r in args.rules:
        for keep in args.keep:
            t0 = time.time()
            state = (global_state(r, keep, args.seed) if r in ("gmag", "glowrank")
                     else pruned_state(r, keep, args.seed, args.whole, args.only))
            res = ev.score(state)
            line = {"seed": args.seed, "rule": r, "keep": keep, "whole": args.whole, "only": args.only, **res,
                    "seconds": round(time.time() - t0, 1)}
            print(json.dumps(line), flush=True)
            with open(common.CACHE / "explore.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
