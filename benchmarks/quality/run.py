"""Quality benchmark: does a KEN subnetwork keep the accuracy of the fine-tune it came from?

    python benchmarks/quality/run.py                    # seed 0, 8 strategies x 4 keep fractions
    python benchmarks/quality/run.py --seeds 0 1 2      # more fine-tune seeds (spread in the report)
    python benchmarks/quality/run.py --report-only      # rebuild the table and plot from cells.jsonl
    python benchmarks/quality/run.py --strategies lowrank-delta-model --keeps 0.05 0.1 --values int4 int2 sign
    python benchmarks/quality/run.py --bitdelta         # + BitDelta (keep 1.0, sign) and dense int8 (keep 1.0)

Base: all-MiniLM-L6-v2 (BertModel, 22.7M parameters, fp32). Task: sentence polarity (Pang & Lee,
4000 sentences, fixed 3000/1000 split). Fine-tune: BertForSequenceClassification, 3 epochs, max
length 64, torch CPU on 2 threads (common.py). Each (strategy, keep) cell goes through the real
pipeline: `run_job` prunes the fine-tune into a Parquet store on a private local Ray, then
`ken_dist.subnetwork.view.open_subnetwork` rebuilds every tensor (base + kept entries) and the rebuilt
model is scored on the 1000 test sentences. References: the full fine-tune, and "base + head"
(every encoder tensor back at its pre-trained value, the trained classifier kept): what any
pruning converges to as keep -> 0.

What the pipeline does with the model: the fine-tune's names are `bert.*` + `classifier.*`, the
base's have no prefix, so the job maps `bert.` -> `` (prefix_map); `classifier.weight/bias` exist
only in the fine-tune and are stored whole (they are new, there is nothing to reset them to);
the base's `embeddings.position_ids` (an int64 buffer the fine-tune does not save) is ignored.
Every float tensor of the encoder is pruned, embeddings, LayerNorms, biases and pooler included
(the default; `--preset attention-only` prunes only the q/k/v/output projections, as the paper's
experiments did, and stores everything else whole).

Value codecs (`--values`, ken_dist.store.codecs): every (strategy, keep) cell is run with each
codec given; every cell records its stored bytes (part files, the whole-stored classifier
included, plus the manifest) and bits per parameter = 8 x those bytes / the fine-tune's parameter
count (every tensor of the manifest). `--bitdelta` adds the two baselines from the field as
strategy/codec pairs: BitDelta's representation without its distillation step (every delta kept,
keep 1.0, `sign`: its sign and one scale per row, embeddings like every other matrix) and a dense
int8 delta (keep 1.0, `int8`).

Everything is cached: the fetched model and data and the fine-tunes under cache/ (gitignored),
every scored cell in results/cells.jsonl (committed), so a rerun only does what is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))
import common  # noqa: E402
from common import CACHE, RESULTS, log  # noqa: E402

STRATEGIES = ["ken", "magnitude", "random", "ken-delta", "lowrank-delta", "lowrank-delta-block", "magnitude-model",
              "lowrank-delta-model"]
KEEPS = [0.1, 0.25, 0.5, 0.75]
CELLS = RESULTS / "cells.jsonl"  # per task: cells{common.task_suffix()}.jsonl (set in main)
IGNORE_MISSING = (r"^embeddings\.position_ids$",)
PREFIX_MAP = {"bert.": ""}


BASELINES = [("magnitude", 1.0, "sign"), ("magnitude", 1.0, "int8")]  # BitDelta (no distillation), dense int8


def cell_name(strategy: str, keep: float, preset: str | None, values: str = "raw") -> str:
    return f"{strategy}-keep{keep:g}" + (f"-{preset}" if preset else "") + (f"-{values}" if values != "raw" else "")


def load_cells() -> list[dict]:
    if not CELLS.exists():
        return []
    return [json.loads(line) for line in CELLS.read_text().splitlines() if line.strip()]


def append_cell(cell: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(CELLS, "a") as f:
        f.write(json.dumps(cell, sort_keys=True) + "\n")


def cell_key(c: dict) -> tuple:
    return (c["seed"], c["strategy"], c.get("keep"), c.get("preset"), c.get("values", "raw"))


class Evaluator:
    """Scores state dicts with one BertForSequenceClassification (config and tokenizer of the fine-tune)."""

    def __init__(self, ft_dir: Path):
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        common.set_threads()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(ft_dir)
        self.model = BertForSequenceClassification.from_pretrained(ft_dir)
        self.full = {k: v.clone() for k, v in self.model.state_dict().items()}
        _, _, self.test_x, self.test_y = common.load_split()

    def score(self, state: dict | None = None) -> dict:
        sd = dict(self.full)
        if state is not None:
            unknown = sorted(set(state) - set(sd))
            if unknown:
                raise SystemExit(f"rebuilt model has tensors the classifier does not: {unknown[:5]}")
            for k, v in state.items():
                if tuple(v.shape) != tuple(sd[k].shape) or v.dtype != sd[k].dtype:
                    raise SystemExit(f"{k}: rebuilt {v.dtype} {tuple(v.shape)} vs {sd[k].dtype} {tuple(sd[k].shape)}")
                sd[k] = v
            missing = sorted(k for k in self.full if k not in state and not k.endswith("position_ids"))
            if missing:
                raise SystemExit(f"rebuilt model lacks {missing[:5]}")
        self.model.load_state_dict(sd, strict=True)
        pred = common.predict(self.model, self.test_x, self.tok)
        return common.scores(pred, self.test_y)


def base_with_head(ft_dir: Path, base_dir: Path) -> dict:
    """The fine-tune's classifier on the pre-trained encoder (every bert.* tensor from the base)."""
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    ft = load_file(str(ft_dir / "model.safetensors"))
    out = {}
    for k, v in ft.items():
        b = k[len("bert."):] if k.startswith("bert.") else None
        out[k] = base[b] if b is not None and b in base else v
    return out


def prune_cells(seed: int, ft_dir: Path, base_dir: Path, todo: list[tuple[str, float, str | None, str]],
                workers: int) -> tuple[Path, float]:
    """One run_job for every missing (strategy, keep, preset, values) of this seed; returns (store, seconds)."""
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime import run_job

    store = CACHE / "stores" / f"s{seed}{common.task_suffix()}"
    t0 = time.time()
    by_preset: dict = {}
    for strategy, keep, preset, values in todo:
        by_preset.setdefault(preset, []).append(
            FineTuneEntry(cell_name(strategy, keep, preset, values), str(ft_dir), None,
                          PruneParams(strategy=strategy, keep=keep, seed=seed, values=values)))
    for preset, entries in by_preset.items():
        job = JobSpec(base=str(base_dir), finetunes=tuple(entries), store=str(store), preset=preset,
                      prefix_map=PREFIX_MAP, ignore_missing=IGNORE_MISSING, workers=workers)
        log(f"seed {seed}: run_job with {len(entries)} fine-tune(s) (preset {preset or 'all'}) -> {store}")
        run_job(job, workers=workers, overwrite=True, quiet=True)
    return store, time.time() - t0


def store_bytes(manifest: dict, manifest_bytes: int) -> dict:
    """Everything the stored fine-tune costs: part files (pruned and whole) and the manifest, and
    bits per parameter over every tensor of the fine-tune (the new classifier included)."""
    pruned = sum(b["bytes"] for t in manifest["tensors"].values() if t["action"] == "prune" for b in t["blocks"])
    whole = sum(b["bytes"] for t in manifest["tensors"].values() if t["action"] == "whole" for b in t["blocks"])
    kept = sum(t.get("kept") or 0 for t in manifest["tensors"].values() if t["action"] == "prune")
    params = sum(t["rows"] * t["row_len"] for t in manifest["tensors"].values() if t["action"] == "prune")
    total = sum(t["rows"] * t["row_len"] for t in manifest["tensors"].values())
    return {"stored_bytes": pruned + whole, "stored_bytes_pruned": pruned, "stored_bytes_whole": whole,
            "manifest_bytes": manifest_bytes, "finetune_params": total,
            "bits_per_param": 8 * (pruned + whole + manifest_bytes) / total,
            "kept_params": kept, "pruned_params": params}


def rebuild(store: Path, name: str, base_dir: Path) -> tuple[dict, dict, int]:
    """Every tensor of the stored fine-tune through ken_dist.subnetwork.view (base + kept entries),
    its manifest and the manifest's size in bytes."""
    from ken_dist.subnetwork.view import open_subnetwork

    with open_subnetwork(store, name, base=str(base_dir)) as sub:
        state = {k: sub.get_tensor(k) for k in sub.keys()}
        manifest = sub.manifest()
        manifest_bytes = sub.store.manifest_size(name)
    return state, manifest, manifest_bytes


def finetune_params(ft_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(ft_dir / "model.safetensors"), "np") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def run_seed(seed: int, strategies, keeps, preset, workers: int, values=("raw",), baselines: bool = False) -> None:
    base_dir = common.base_model_dir()
    ft_dir = common.finetune(seed)
    train_info = json.loads((ft_dir / "train.json").read_text())
    done = {cell_key(c) for c in load_cells()}
    ev = None
    recorded = [c for c in load_cells() if c["seed"] == seed and c["strategy"] == "full fine-tune"]
    if recorded:  # cells scored on an earlier copy of this fine-tune: mix only if it is the same model
        ev = Evaluator(ft_dir)
        now = ev.score(None)["accuracy"]
        if abs(now - recorded[-1]["accuracy"]) > 1e-9:
            raise SystemExit(f"seed {seed}: the fine-tune in {ft_dir} scores {now:.4f}, the cells in {CELLS} were "
                             f"scored on one that scored {recorded[-1]['accuracy']:.4f}; the fine-tune is not the "
                             f"same model, so its cells cannot be mixed: move {CELLS.name} aside and rerun")
        log(f"seed {seed}: fine-tune reproduces the recorded accuracy {now:.4f}")
    for ref in ("full fine-tune", "base + head"):
        if (seed, ref, None, None, "raw") in done:
            continue
        ev = ev or Evaluator(ft_dir)
        t0 = time.time()
        res = ev.score(None if ref == "full fine-tune" else base_with_head(ft_dir, base_dir))
        dense = os.path.getsize(ft_dir / "model.safetensors")
        append_cell({"seed": seed, "strategy": ref, "keep": None, "preset": None, **res,
                     "stored_bytes": dense if ref == "full fine-tune" else None,
                     "bits_per_param": 8 * dense / finetune_params(ft_dir) if ref == "full fine-tune" else None,
                     "finetune_seconds": train_info["seconds"], "eval_seconds": round(time.time() - t0, 1)})
        log(f"seed {seed} {ref}: accuracy {res['accuracy']:.4f} F1w {res['f1_weighted']:.4f}")
    todo = [(s, k, preset, v) for s in strategies for k in keeps for v in values]
    todo += [(s, k, preset, v) for s, k, v in BASELINES] if baselines else []
    todo = [c for c in dict.fromkeys(todo) if (seed, *c) not in done]
    if not todo:
        return
    store, prune_s = prune_cells(seed, ft_dir, base_dir, todo, workers)
    log(f"seed {seed}: pruned {len(todo)} cell(s) in {prune_s:.0f} s")
    ev = ev or Evaluator(ft_dir)
    for strategy, keep, pre, values in todo:
        t0 = time.time()
        state, manifest, manifest_bytes = rebuild(store, cell_name(strategy, keep, pre, values), base_dir)
        t_rebuild = time.time() - t0
        res = ev.score(state)
        sizes = store_bytes(manifest, manifest_bytes)
        append_cell({"seed": seed, "strategy": strategy, "keep": keep, "preset": pre, "values": values, **res,
                     **sizes, "prune_seconds_job": round(prune_s, 1), "rebuild_seconds": round(t_rebuild, 1),
                     "eval_seconds": round(time.time() - t0 - t_rebuild, 1)})
        log(f"seed {seed} {strategy} keep {keep} {pre or ''} values {values}: accuracy {res['accuracy']:.4f} "
            f"F1w {res['f1_weighted']:.4f}, {sizes['bits_per_param']:.3f} bits/param")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--keeps", type=float, nargs="+", default=KEEPS)
    ap.add_argument("--preset", default=None, choices=["attention-only"], help="prune only attention projections")
    ap.add_argument("--values", nargs="+", default=["raw"], help="value codecs (raw, int8, int4, int2, sign[-gG])")
    ap.add_argument("--bitdelta", action="store_true",
                    help="also BitDelta's representation (keep 1.0, sign) and a dense int8 delta (keep 1.0, int8)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--task", default="sentences", choices=list(common.TASKS),
                    help="sentences (Pang & Lee sentences, the default) or reviews (document-level, common.py)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    global CELLS
    common.set_task(args.task)
    CELLS = RESULTS / f"cells{common.task_suffix()}.jsonl"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not args.report_only:
        for seed in args.seeds:
            run_seed(seed, args.strategies, args.keeps, args.preset, args.workers, args.values, args.bitdelta)
    import report
    report.write_report(load_cells())
    return 0


if __name__ == "__main__":
    sys.exit(main())
