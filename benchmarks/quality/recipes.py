"""In-memory search for a 1-bit recipe (issue 13): selection rule x budget allocation x keep x value
codec, scored without Ray or a store on disk, but with the store's own bytes.

    python benchmarks/quality/recipes.py --task sentences --seeds 0 1 2 --candidates current ffn-x2
    python benchmarks/quality/recipes.py --list            # the candidates and what each does

A candidate ranks every entry of the pruned tensors by the product's `lowrank-delta-model` score
(the registered function: delta x rank-4 part of its tensor's delta, delta^2 for a 1-D tensor;
one block per tensor, as the planner makes them on MiniLM; explore.py's gmag uses
`magnitude-model`'s), optionally
reweighted per tensor group or normalised per tensor, and keeps the `keep` x (all pruned entries)
best, optionally with a fixed share for some groups. Each tensor's mask then goes through the
store's part encoder (ken_dist.store.parts.encode_block, the value codec included) and decoder
(block_rows), so the values scored are exactly what a store would rebuild and the part bytes are
exactly what it would write; bits/param adds the whole-stored classifier and the manifest as
measured on the real stores (OVERHEAD_BYTES). Only the selection's tie handling differs from the
pipeline (exact top-k here, a proportional split of the boundary score bin there: budget.py).
Results are appended to results/recipes.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))
import common  # noqa: E402
from restore_groups import GROUPS  # noqa: E402
from run import Evaluator  # noqa: E402

from ken_dist.checkpoints.geometry import row_geometry  # noqa: E402
from ken_dist.kernel.strategies.registry import get_strategy  # noqa: E402
from ken_dist.store.codecs import parse_codec  # noqa: E402
from ken_dist.store.parts import block_rows, encode_block, part_bytes  # noqa: E402

# The whole-stored classifier (3.47 KB) plus the manifest (84.8 KB) of the recipe's real stores
# (results/cells*.jsonl: stored_bytes_whole + manifest_bytes), the same tensors for every candidate.
OVERHEAD_BYTES = 3474 + 84800
OUT = common.RESULTS / "recipes.jsonl"


def group_of(name: str, t: torch.Tensor) -> str:
    """The restore_groups.py group of a fine-tune tensor (first match, so 1-D tensors are '1-D')."""
    return next(label for label, member in GROUPS.items() if member(name, t))


@dataclass(frozen=True)
class Candidate:
    """weights: score multiplier per group; normalise: divide each tensor's scores by its mean
    delta^2 (its share then follows the score's shape, not the tensor's delta scale); fixed: a
    group's kept fraction of its own entries (chosen by score inside the group), the rest of the
    budget spent by score over the other groups; `zero`: groups reset to the base (kept nothing)."""
    keep: float
    values: str
    weights: dict = field(default_factory=dict)
    normalise: bool = False
    fixed: dict = field(default_factory=dict)
    note: str = ""


FFN, ATT, EMB, ONE_D = "feed-forward matrices", "attention matrices", "embeddings", "1-D (LayerNorm, biases)"
CANDIDATES = {
    "current": Candidate(0.25, "sign-g64", note="lowrank-delta-model as shipped (reference)"),
    "current-sign": Candidate(0.25, "sign", note="one scale per row"),
    "ffn-x2": Candidate(0.25, "sign-g64", weights={FFN: 2.0}, note="FFN scores x2"),
    "ffn-x4": Candidate(0.25, "sign-g64", weights={FFN: 4.0}, note="FFN scores x4 (x2 in delta units)"),
    "ffn-x2-k0.27-sign": Candidate(0.27, "sign", weights={FFN: 2.0}),
    "normalised-k0.22": Candidate(0.22, "sign-g64", normalise=True, note="score / tensor's mean delta^2"),
    "emb-2pct": Candidate(0.25, "sign-g64", fixed={EMB: 0.02}, note="embeddings keep 2% of their entries"),
    "emb-2pct-k0.28": Candidate(0.28, "sign-g64", fixed={EMB: 0.02}),
    "emb-2pct-ffn-x2-k0.28": Candidate(0.28, "sign-g64", fixed={EMB: 0.02}, weights={FFN: 2.0}),
    "emb-0": Candidate(0.25, "sign-g64", fixed={EMB: 0.0}, note="embeddings reset to base, budget to the rest"),
    "emb-0-k0.3": Candidate(0.3, "sign-g64", fixed={EMB: 0.0}),
    "emb-0-k0.35": Candidate(0.35, "sign-g64", fixed={EMB: 0.0}),
    "emb-0-ffn-x2-k0.3": Candidate(0.3, "sign-g64", fixed={EMB: 0.0}, weights={FFN: 2.0}),
    "emb-0-k0.22-int2": Candidate(0.22, "int2-g64", fixed={EMB: 0.0}),
}

# Post-hoc diagnostics (run after the held-out check; never candidates): where a seed's loss comes from.
DIAGNOSTICS = {
    "current-raw": Candidate(0.25, "raw"),
    "current-k0.5-raw": Candidate(0.5, "raw"),
    "chosen-raw": Candidate(0.28, "raw", fixed={EMB: 0.02}, weights={FFN: 2.0}),
    "chosen-int2": Candidate(0.28, "int2-g64", fixed={EMB: 0.02}, weights={FFN: 2.0}),
    "chosen-int4": Candidate(0.28, "int4-g64", fixed={EMB: 0.02}, weights={FFN: 2.0}),
    "ffn-all-raw": Candidate(0.56, "raw", fixed={FFN: 1.0}, note="every FFN entry + 5.7M more by score"),
    "ffn-0.75-raw": Candidate(0.48, "raw", fixed={FFN: 0.75}),
    "dense-sign-g64": Candidate(1.0, "sign-g64", note="every delta, 1-bit"),
    "dense-int2-g64": Candidate(1.0, "int2-g64"),
    # fit_scales.py's points of the curve beside the recipe: the stretch budget and BitDelta's own
    "k0.1-sign": Candidate(0.1, "sign", note="~0.5 bit/param"),
    "bitdelta": Candidate(1.0, "sign", note="BitDelta's representation: every delta's sign, one scale per row"),
}


class Prepared:
    """One fine-tune against the base: every pruned tensor as [rows, n] float32 arrays, its score
    and group, and the untouched rest of the state dict."""

    def __init__(self, seed: int, strategy: str = "lowrank-delta-model"):
        from safetensors.torch import load_file

        score = get_strategy(strategy).fn  # a model-scope strategy's score, exactly as the pipeline computes it

        ft = load_file(str(common.finetune_dir(seed) / "model.safetensors"))
        base = load_file(str(common.base_model_dir() / "model.safetensors"))
        self.state, self.tensors = dict(ft), {}
        for name, f in ft.items():
            b = base.get(name[len("bert."):]) if name.startswith("bert.") else None
            if b is None or not f.is_floating_point():
                continue
            rows, _ = row_geometry(f.shape)
            f2, b2 = f.reshape(rows, -1).float().numpy(), b.reshape(rows, -1).float().numpy()
            self.tensors[name] = (f2, b2, score(f2, b2), group_of(name, f))
        self.entries = sum(t[0].size for t in self.tensors.values())

    def masks(self, c: Candidate) -> dict:
        """{tensor: bool mask} of the candidate: exactly round(keep x entries) kept in all."""
        total = int(round(c.keep * self.entries))
        scores = {}
        for name, (f2, _, s, grp) in self.tensors.items():
            s = s * c.weights.get(grp, 1.0)
            if c.normalise:
                s = s / max(float(np.mean((f2 - self.tensors[name][1]).astype(np.float64) ** 2)), 1e-300)
            scores[name] = s
        masks = {}
        for grp, frac in c.fixed.items():
            names = [n for n in scores if self.tensors[n][3] == grp]
            want = int(round(frac * sum(scores[n].size for n in names)))
            masks.update(_top(scores, names, want))
            total -= want
        rest = [n for n in scores if n not in masks]
        masks.update(_top(scores, rest, total))
        return masks

    def parts(self, c: Candidate) -> tuple[dict, int, dict]:
        """({tensor: (part table, stats)} as the store's encoder writes them, part bytes, kept
        fraction per group)."""
        codec = parse_codec(c.values)
        tables, nbytes, kept, size = {}, 0, {}, {}
        for name, m in self.masks(c).items():
            f2, b2, _, grp = self.tensors[name]
            table, stats = encode_block(0, m, f2, codec=codec, base=b2, dtype="F32")
            tables[name] = (table, stats)
            nbytes += len(part_bytes(table))
            kept[grp] = kept.get(grp, 0) + int(m.sum())
            size[grp] = size.get(grp, 0) + m.size
        return tables, nbytes, {g: kept[g] / size[g] for g in kept}

    def rebuilt(self, name: str, table, stats: dict) -> torch.Tensor:
        """Tensor `name` as the store's decoder rebuilds it from its part."""
        f2, b2, _, _ = self.tensors[name]
        out = b2.copy()
        for a, keep, vals in block_rows(table, f2.shape[1], "F32", 0, f2.shape[0], codec=stats.get("values", "raw"),
                                        index=stats.get("index", "mask"), base_rows=lambda i, j: b2[i:j]):
            rows = out[a:a + keep.shape[0]]
            rows[keep] = vals.view(np.float32)
        return torch.from_numpy(out).reshape(self.state[name].shape)

    def apply(self, c: Candidate) -> tuple[dict, int, dict]:
        """(state dict as the store would rebuild it, part bytes, kept fraction per group)."""
        tables, nbytes, shares = self.parts(c)
        state = dict(self.state)
        for name, (table, stats) in tables.items():
            state[name] = self.rebuilt(name, table, stats)
        return state, nbytes, shares


def _top(scores: dict, names: list, want: int) -> dict:
    """Masks over `names` keeping their `want` best scores overall (ties: earlier tensor, smaller index)."""
    if not names:
        return {}
    flat = np.concatenate([scores[n].reshape(-1) for n in names])
    keep = np.zeros(flat.size, bool)
    if want > 0:
        keep[np.argsort(-flat, kind="stable")[:want]] = True
    out, at = {}, 0
    for n in names:
        out[n] = keep[at:at + scores[n].size].reshape(scores[n].shape)
        at += scores[n].size
    return out


def table(tasks: list[str], max_bits: float = 0.97) -> str:
    """Markdown table of results/recipes.jsonl over `tasks` (seeds 0-2 each) with the selection
    rule of results/recipe_search.md: eligible when bits/param <= max_bits on every fine-tune;
    among those the smallest worst-seed gap, a tie within 0.1 point to fewer (mean) bits."""
    last = {}
    for line in OUT.read_text().splitlines():
        r = json.loads(line)
        if r["task"] in tasks and r.get("strategy", "lowrank-delta-model") == "lowrank-delta-model":
            last[(r["candidate"], r["task"], r["seed"])] = r
    cells = [(t, s) for t in tasks for s in (0, 1, 2)]
    rows = []
    for name in CANDIDATES:
        got = [last.get((name, t, s)) for t, s in cells]
        if any(g is None for g in got):
            continue
        bits = [g["bits_per_param"] for g in got]
        gaps = [g["gap_points"] for g in got]
        rows.append((name, max(bits), float(np.mean(bits)), gaps, min(gaps)))
    eligible = [r for r in rows if r[1] <= max_bits]
    best = max((r[4] for r in eligible), default=None)
    chosen = min((r for r in eligible if r[4] >= best - 0.1), key=lambda r: r[2], default=None)
    head = " | ".join(f"{t} s{s}" for t, s in cells)
    out = [f"| candidate | bits/param max (mean) | {head} | worst | eligible |",
           "|---|---|" + "---|" * len(cells) + "---|---|"]
    for r in rows:
        mark = "**" if chosen is not None and r[0] == chosen[0] else ""
        out.append(f"| {mark}{r[0]}{mark} | {r[1]:.3f} ({r[2]:.3f}) | " + " | ".join(f"{g:+.1f}" for g in r[3])
                   + f" | {r[4]:+.1f} | {'yes' if r[1] <= max_bits else 'no'} |")
    out.append("")
    out.append(f"chosen: {chosen[0] if chosen else None}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentences", choices=list(common.TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--strategy", default="lowrank-delta-model", help="the model-scope score (magnitude-model)")
    ap.add_argument("--bits-only", action="store_true", help="encode and count bytes, no scoring")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", nargs="+", metavar="TASK", help="print the results table (and the choice) over these tasks")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if args.list:
        for k, c in CANDIDATES.items():
            print(k, c)
        return 0
    common.set_task(args.task)
    for seed in args.seeds:
        t0 = time.time()
        prep = Prepared(seed, args.strategy)
        ev = None if args.bits_only else Evaluator(common.finetune_dir(seed))
        full = None if ev is None else ev.score(None)["accuracy"]
        common.log(f"{args.task} seed {seed}: prepared in {time.time() - t0:.0f} s, full fine-tune {full}")
        for name in args.candidates:
            t0 = time.time()
            c = CANDIDATES.get(name) or DIAGNOSTICS[name]
            state, nbytes, shares = prep.apply(c)
            line = {"task": args.task, "seed": seed, "candidate": name, "strategy": args.strategy, "keep": c.keep, "values": c.values,
                    "part_bytes": nbytes, "bits_per_param": 8 * (nbytes + OVERHEAD_BYTES) / (prep.entries + 770),
                    "kept_share": {g: round(v, 4) for g, v in shares.items()}}
            if ev is not None:
                acc = ev.score(state)["accuracy"]
                line.update(accuracy=acc, full=full, gap_points=round(100 * (acc - full), 2))
            line["seconds"] = round(time.time() - t0, 1)
            print(json.dumps(line), flush=True)
            if ev is not None:
                with open(OUT, "a") as f:
                    f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
