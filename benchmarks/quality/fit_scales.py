"""Does fitting the stored scales on unlabeled calibration text recover a 1-bit recipe's loss?
(issue 13: BitDelta's distillation step, which the product does not do.)

    python benchmarks/quality/fit_scales.py --task reviews --seeds 0 1 2 [--candidate current]

For each fine-tune: the recipe's state dict exactly as a store rebuilds it (recipes.Prepared,
the store's own encoder and decoder), then one multiplier per row of every pruned tensor on its
kept deltas (w = base + a_row * (kept value - base)), fitted by Adam to the full fine-tune's
logits (mean squared error) on --calib training texts, no labels. A per-row multiplier only
rescales the row's stored scales (sign / int codes times a bf16 scale per row or group), so a
store holds the fitted recipe at the same size: "stored" scores exactly that, each part's scales
column replaced by bf16(max(a_row, 0) x scale) and decoded by the store's own decoder
(parts.block_rows); "fitted" scores the float32 multipliers before that rounding. Scores the test
split before and after the fit; the full fine-tune is the reference. Appends to
results/fit_scales.jsonl. An experiment, not yet a product path.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from recipes import CANDIDATES, DIAGNOSTICS, OVERHEAD_BYTES, Prepared  # noqa: E402
from run import Evaluator  # noqa: E402

from ken_dist.store.codecs import bf16_scale_bits, scale_values  # noqa: E402

OUT = common.RESULTS / "fit_scales.jsonl"


def rescaled(table, alpha: np.ndarray):
    """The part with each row's bf16 scales times that row's multiplier (clipped at 0), rounded to bf16."""
    col = table.column("scales").combine_chunks()
    offsets = np.frombuffer(col.buffers()[1], np.int32, len(col) + 1, col.offset * 4)
    bits = np.frombuffer(col.buffers()[2], np.uint16, (offsets[-1] - offsets[0]) // 2, offsets[0]).copy()
    per_row = np.diff(offsets) // 2
    new = bf16_scale_bits(scale_values(bits).astype(np.float64) * np.repeat(np.maximum(alpha, 0.0), per_row))
    arr = pa.Array.from_buffers(pa.binary(), len(col), [None, pa.py_buffer((offsets - offsets[0]).astype(np.int32)),
                                                        pa.py_buffer(new.astype("<u2").view(np.uint8))])
    return table.set_column(table.schema.get_field_index("scales"), "scales", arr)


def fit(ev: Evaluator, prep: Prepared, state: dict, texts: list[str], steps: int, lr: float, batch: int,
        seed: int) -> tuple[dict, list[float], dict]:
    """(the state dict with fitted row multipliers on the kept deltas, the loss per step, the
    multipliers per tensor)."""
    from torch.func import functional_call

    model = ev.model
    model.load_state_dict(ev.full, strict=True)
    model.eval()
    enc = ev.tok(texts, truncation=True, max_length=common.MAX_LENGTH, padding=True, return_tensors="pt")
    with torch.inference_mode():
        teacher = torch.cat([model(**{k: v[b:b + 64] for k, v in enc.items()}).logits for b in range(0, len(texts), 64)])
    base, delta, alpha = {}, {}, {}
    for name, (f2, b2, _, _) in prep.tensors.items():
        shape = prep.state[name].shape
        b = torch.from_numpy(b2)
        base[name] = (b, shape)
        delta[name] = state[name].reshape(b.shape).float() - b
        alpha[name] = torch.ones(b.shape[0], 1, requires_grad=True)
    fixed = {k: v for k, v in state.items() if k not in prep.tensors}
    opt = torch.optim.Adam(alpha.values(), lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(len(texts), size=min(batch, len(texts)), replace=False))
        params = {**fixed, **{n: (base[n][0] + alpha[n] * delta[n]).reshape(base[n][1]) for n in alpha}}
        logits = functional_call(model, params, kwargs={k: v[pick] for k, v in enc.items()})
        loss = torch.mean((logits.logits - teacher[pick]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        out = dict(state)
        for n in alpha:
            out[n] = (base[n][0] + alpha[n] * delta[n]).reshape(base[n][1]).to(state[n].dtype)
    return out, losses, {n: a.detach().numpy().reshape(-1).astype(np.float64) for n, a in alpha.items()}


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
        fitted, losses, alpha = fit(ev, prep, state, calib, args.steps, args.lr, args.batch, seed)
        after = ev.score(fitted)["accuracy"]
        stored = dict(state)
        for name, (table, stats) in tables.items():
            if "values" in stats:  # a lossy part: its scales carry the multipliers
                stored[name] = prep.rebuilt(name, rescaled(table, alpha[name]), stats)
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
                "loss_first": round(losses[0], 4), "loss_last": round(float(np.mean(losses[-10:])), 4),
                "fit_seconds": round(time.time() - t1, 1), "seconds": round(time.time() - t0, 1)}
        print(json.dumps(line), flush=True)
        with open(OUT, "a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
