"""Does fitting the stored scales on unlabeled calibration text recover a 1-bit recipe's loss?
(issue 13: BitDelta's distillation step, which the product does not do.)

    python benchmarks/quality/fit_scales.py --task reviews --seeds 0 1 2 [--candidate current]

For each fine-tune: the recipe's state dict exactly as a store rebuilds it (recipes.Prepared,
the store's own encoder and decoder), then one multiplier per row of every pruned tensor on its
kept deltas (w = base + a_row * (kept value - base)), fitted by Adam to the full fine-tune's
logits (mean squared error) on --calib training texts, no labels: the fit of `ken-dist
fit-scales` (ken_dist.subnetwork.fit_scales.fit_multipliers), run here on state dicts so that
recipes and calibration draws can be compared without writing a store for each. A per-row multiplier only
rescales the row's stored scales (sign / int codes times a bf16 scale per row or group), so a
store holds the fitted recipe at the same size: "stored" scores exactly that, each part's scales
column replaced by bf16(max(a_row, 0) x scale) and decoded by the store's own decoder
(parts.block_rows); "fitted" scores the float32 multipliers before that rounding. Scores the test
split before and after the fit; the full fine-tune is the reference. Appends to
results/fit_scales.jsonl (lines before 2026-11-29 18:00 UTC came from this script's own copy of
the fit, which precomputed the teacher's logits and wrote w = base + a * delta; loss_first and
loss_last there were the first and the last 10 batches' errors, now loss_before and loss_after
are over all calibration texts). The product path: benchmarks/quality/cli_check.py --fit-texts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from recipes import CANDIDATES, DIAGNOSTICS, OVERHEAD_BYTES, Prepared  # noqa: E402
from run import Evaluator  # noqa: E402

from ken_dist.store.parts import rescale_scales  # noqa: E402
from ken_dist.subnetwork.fit_scales import fit_multipliers, output_error  # noqa: E402

OUT = common.RESULTS / "fit_scales.jsonl"


def fit(ev: Evaluator, prep: Prepared, state: dict, texts: list[str], steps: int, lr: float, batch: int,
        seed: int) -> tuple[dict, dict, tuple[float, float]]:
    """(the state dict with fitted row multipliers on the kept deltas, the multipliers per tensor,
    the output error before and after):
    the product's own fit (ken_dist.subnetwork.fit_scales.fit_multipliers) on the recipe's state."""
    import copy

    teacher = copy.deepcopy(ev.model)
    teacher.load_state_dict(ev.full, strict=True)
    student = ev.model
    student.load_state_dict(state, strict=True)
    for m in (teacher.eval(), student.eval()):
        for p in m.parameters():
            p.requires_grad_(False)
    enc = dict(ev.tok(texts, truncation=True, max_length=common.MAX_LENGTH, padding=True, return_tensors="pt"))
    deltas = {name: state[name].reshape(b2.shape).float() - torch.from_numpy(b2)
              for name, (_, b2, _, _) in prep.tensors.items()}
    alpha = fit_multipliers(student, teacher, enc, deltas, steps=steps, lr=lr, batch=batch, seed=seed)
    loss_first = output_error(student, teacher, enc, batch)
    out = dict(state)
    for n, d in deltas.items():
        out[n] = (state[n].reshape(d.shape) + (alpha[n] - 1) * d).reshape(state[n].shape).to(state[n].dtype)
    student.load_state_dict(out, strict=True)
    loss_last = output_error(student, teacher, enc, batch)
    return out, {n: a.numpy().reshape(-1).astype(np.float64) for n, a in alpha.items()}, (loss_first, loss_last)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentences", choices=list(common.TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--candidate", default="current")
    ap.add_argument("--calib", type=int, default=512, help="training texts used, no labels")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calib-draw", type=int, default=0, help="another draw of the calibration texts (0: the default draw)")
    args = ap.parse_args(argv)
    common.set_task(args.task)
    c = CANDIDATES.get(args.candidate) or DIAGNOSTICS[args.candidate]
    train_x, _, _, _ = common.load_split()
    for seed in args.seeds:
        t0 = time.time()
        prep = Prepared(seed)
        ev = Evaluator(common.finetune_dir(seed))
        full = ev.score(None)["accuracy"]
        tables, nbytes, _ = prep.parts(c)
        state = {**prep.state, **{name: prep.rebuilt(name, *part) for name, part in tables.items()}}
        before = ev.score(state)["accuracy"]
        draw = 1000 + seed + 7919 * args.calib_draw  # 0: the draw of every recorded run before this option
        calib = [train_x[i] for i in np.random.default_rng(draw).choice(len(train_x), args.calib, replace=False)]
        t1 = time.time()
        fitted, alpha, losses = fit(ev, prep, state, calib, args.steps, args.lr, args.batch, seed)
        after = ev.score(fitted)["accuracy"]
        stored = dict(state)
        for name, (table, stats) in tables.items():
            if "values" in stats:  # a lossy part: its scales carry the multipliers
                stored[name] = prep.rebuilt(name, rescale_scales(table, np.maximum(alpha[name], 0.0)), stats)
            else:
                stored[name] = fitted[name]
        after_stored = ev.score(stored)["accuracy"]
        a_all = np.concatenate(list(alpha.values()))
        line = {"task": args.task, "seed": seed, "candidate": args.candidate, "calib": args.calib, "calib_draw": args.calib_draw, "steps": args.steps,
                "lr": args.lr, "bits_per_param": round(8 * (nbytes + OVERHEAD_BYTES) / (prep.entries + 770), 4),
                "full": full, "gap_before": round(100 * (before - full), 2), "gap_after": round(100 * (after - full), 2),
                "gap_stored": round(100 * (after_stored - full), 2),
                "alpha_min": round(float(a_all.min()), 3), "alpha_median": round(float(np.median(a_all)), 3),
                "alpha_max": round(float(a_all.max()), 3),
                "loss_before": round(losses[0], 4), "loss_after": round(losses[1], 4),
                "fit_seconds": round(time.time() - t1, 1), "seconds": round(time.time() - t0, 1)}
        print(json.dumps(line), flush=True)
        with open(OUT, "a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
