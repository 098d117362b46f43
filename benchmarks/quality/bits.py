"""Bits per parameter of each (strategy, keep, value codec) on the real MiniLM base, no accuracy.

    python benchmarks/quality/bits.py                    # a generated fine-tune of the MiniLM base
    python benchmarks/quality/bits.py --finetune DIR     # a real one (e.g. cache/finetune-s0)

What a store costs does not need a trained fine-tune: it depends on the tensor shapes, which
entries are kept per row and how compressible the stored codes are. Without --finetune the
fine-tune is generated from the cached all-MiniLM-L6-v2 (common.py): every encoder tensor is
base + N(0, (0.02 x the tensor's std)^2) rounded to fp32, except 71% of the word-embedding rows,
left exactly at the base (the share of token rows a real fine-tune of this task left unchanged,
docs/quality.md "Beyond the paper"), saved under `bert.` names with a new classifier head
(2 x 384 weights + 2 biases), as run.py's fine-tunes are. Each cell goes through
run_job into one store and is counted as run.py counts it: part files (pruned and whole) plus
the manifest, over the fine-tune's parameter count. Results: results/bits.jsonl and results/bits.md.
Real deltas are low-rank and heavy-tailed where these are Gaussian: the codes' entropy, and so
what zstd leaves of them, may differ a little; raw values are fp32 bytes either way.
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
from run import BASELINES, IGNORE_MISSING, PREFIX_MAP, cell_name, store_bytes  # noqa: E402

STRATEGIES = ["magnitude-model", "lowrank-delta-model"]
KEEPS = [0.05, 0.1, 0.25]
VALUES = ["raw", "int8", "int4", "int2", "sign"]
REFERENCE = [("ken", 0.25, "raw")]  # KEN's own row: the paper's rule, raw values


def generated_finetune(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """base + small Gaussian deltas under `bert.` names, plus a new classifier head."""
    if (out / "model.safetensors").exists():
        return out
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(seed)
    base = load_file(str(base_dir / "model.safetensors"))
    ft = {}
    for name, t in base.items():
        if t.dtype.kind != "f" or name.endswith("position_ids"):
            continue
        delta = rng.normal(0, 0.02 * float(t.std()) or 1e-3, t.shape)
        if name == "embeddings.word_embeddings.weight":
            delta[rng.random(t.shape[0]) < 0.71] = 0.0
        ft["bert." + name] = (t + delta).astype(t.dtype)
    ft["classifier.weight"] = rng.normal(0, 0.02, (2, 384)).astype(np.float32)
    ft["classifier.bias"] = np.zeros(2, np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(ft, str(out / "model.safetensors"))
    (out / "config.json").write_text((base_dir / "config.json").read_text())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finetune", type=Path, help="a fine-tune directory (default: a generated one)")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--keeps", type=float, nargs="+", default=KEEPS)
    ap.add_argument("--values", nargs="+", default=VALUES)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime import run_job
    from ken_dist.store.protocol import Store

    base_dir = common.base_model_dir()
    ft_dir = args.finetune or generated_finetune(base_dir, CACHE / "generated-finetune")
    cells = [(s, k, v) for s in args.strategies for k in args.keeps for v in args.values] + BASELINES + REFERENCE
    store = CACHE / "stores" / ("bits-" + ft_dir.name)
    entries = tuple(FineTuneEntry(cell_name(s, k, None, v), str(ft_dir), None, PruneParams(strategy=s, keep=k, values=v))
                    for s, k, v in cells)
    job = JobSpec(base=str(base_dir), finetunes=entries, store=str(store), prefix_map=PREFIX_MAP,
                  ignore_missing=IGNORE_MISSING, workers=args.workers)
    t0 = time.time()
    run_job(job, workers=args.workers, overwrite=True, quiet=True)
    log(f"{len(cells)} cells pruned in {time.time() - t0:.0f} s -> {store}")
    opened = Store(store)
    rows = []
    for s, k, v in cells:
        name = cell_name(s, k, None, v)
        sizes = store_bytes(opened.manifest(name), opened.manifest_size(name))
        rows.append({"finetune": ft_dir.name, "strategy": s, "keep": k, "values": v, **sizes})
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "bits.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    lines = [f"# Bits per parameter on all-MiniLM-L6-v2 ({ft_dir.name}; no accuracy here, see quality.md)", "",
             "8 x (part files + manifest) / the fine-tune's parameters "
             f"({rows[0]['finetune_params']:,}, the new classifier included); dense fp32 = 32 bits. "
             "`python benchmarks/quality/bits.py`", "",
             "| strategy | keep | values | bits/param | stored MiB | of which whole | manifest KiB |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bits_per_param"]):
        lines.append(f"| {r['strategy']} | {r['keep']:g} | {r['values']} | {r['bits_per_param']:.3f} | "
                     f"{r['stored_bytes'] / 2**20:.2f} | {r['stored_bytes_whole'] / 2**20:.3f} | "
                     f"{r['manifest_bytes'] / 2**10:.1f} |")
    (RESULTS / "bits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
