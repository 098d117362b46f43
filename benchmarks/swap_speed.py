"""Switching a loaded model between two stored fine-tunes vs loading the dense fine-tune afresh.

Measured side by side in one run, on one generated Llama-shaped bf16 base, as the time until
the model answers for the new task (the operation plus one forward pass over 16 tokens, which
also pays for any weight pages a memory map has not read yet):
  swap               ken_dist.swap(model, store, a, b) in place: base values back at a's kept
                     indices, b's kept entries written (reads a's and b's part files and the
                     base rows holding a's kept entries)
  from_pretrained    LlamaForCausalLM.from_pretrained(<b materialized as a dense directory>)
  load_model         ken_dist.load_model(store, b): the base through from_pretrained + b's entries
"warm": every file in the page cache (median of --repeats). "cold": the files the operation
reads are first dropped from the page cache with posix_fadvise(DONTNEED) (this process's own
files only; pages a live model maps stay). The swapped model is checked bit for bit against
the dense load. Fine-tune a is ken_dist.testing.synthetic's; b is the same base perturbed with another
seed. Both are pruned into one store with run_job on a private local Ray; everything is written
under a temporary directory that is removed at the end.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/swap_speed.py             # 134M params
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python benchmarks/swap_speed.py --layers 24   # 220M
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ken_dist  # noqa: E402
from ken_dist.checkpoints.geometry import row_geometry  # noqa: E402
from ken_dist.job.plan import PruneParams  # noqa: E402
from ken_dist.job.spec import FineTuneEntry, JobSpec  # noqa: E402
from ken_dist.runtime import run_job  # noqa: E402
from ken_dist.testing.synthetic import LlamaShape, write_pair  # noqa: E402


def second_finetune(base: Path, out: Path, seed: int) -> Path:
    """base + N(0, 0.002) everywhere, 10x on 5% of rows: another task tuned from the same base,
    written shard by shard (one shard in memory at a time)."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(base.iterdir()):
        if f.suffix == ".safetensors":
            tensors = {}
            for name, t in load_file(f).items():
                x = t.float()
                delta = torch.randn(x.shape, generator=gen) * 0.002
                rows, _ = row_geometry(x.shape)
                moved = (torch.rand(rows, generator=gen) < 0.05).float() * 9 + 1
                delta = delta * (moved.view(-1, *([1] * (x.dim() - 1))) if x.dim() > 1 else moved)
                tensors[name] = (x + delta).to(t.dtype)
            save_file(tensors, out / f.name, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copyfile(f, out / f.name)
    return out


def drop_cache(paths) -> None:
    """Evict these files' pages from the page cache (clean pages not mapped by a live process)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(*dirs) -> list[str]:
    return [str(f) for d in dirs for f in Path(d).rglob("*") if f.is_file()]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3, help="warm runs per operation (median); cold runs once")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = p.parse_args()
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                       heads=max(1, args.hidden // 64), kv_heads=max(1, args.hidden // 64))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="ken-swap-bench-"))
    warnings.simplefilter("ignore")
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        t0 = time.perf_counter()
        if (root / "finetune_b" / "config.json").exists():  # a --workdir kept from an earlier run
            base, ft_a, ft_b = root / "base", root / "finetune", root / "finetune_b"
        else:
            base, ft_a = write_pair(root, shape, dtype="bf16", seed=0, shard_bytes=256 * 2**20)
            ft_b = second_finetune(base, root / "finetune_b", seed=1)
        print(f"generated a {shape.parameters() / 1e6:.0f}M-parameter bf16 Llama-shaped base and two fine-tunes "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        store = root / "store"
        t0 = time.perf_counter()
        run_job(JobSpec(base=str(base), store=str(store), finetunes=(
            FineTuneEntry("a", str(ft_a), None, PruneParams(keep=args.keep)),
            FineTuneEntry("b", str(ft_b), None, PruneParams(keep=args.keep)))), workers=args.workers, quiet=True)
        report = ken_dist.inspect_store(store)["finetunes"]
        print(f"pruned both at keep={args.keep} in {time.perf_counter() - t0:.1f} s; store "
              f"{sum(f['stored_bytes'] for f in report.values()) / 2**20:.0f} MiB for two fine-tunes of "
              f"{report['b']['dense_bytes'] / 2**20:.0f} MiB each", flush=True)
        dense_b = root / "dense_b"
        ken_dist.materialize(store, "b", dense_b, overwrite=True)

        ids = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0))

        def forward(model):
            with torch.no_grad():
                model(input_ids=ids)
            return model

        parts = {ft: [str(store / b["file"]) for t in ken_dist.open_subnetwork(store, ft).manifest()["tensors"].values()
                      for b in t["blocks"]] for ft in ("a", "b")}
        base_files = files_under(base)
        model = ken_dist.load_model(store, "a")
        holds = ["a"]

        def swap_and_forward(cold: bool):
            to = "b" if holds[0] == "a" else "a"
            if cold:
                drop_cache(parts["a"] + parts["b"] + base_files)

            def op():
                ken_dist.swap(model, store, holds[0], to)
                return forward(model)
            t, _ = timed(op)
            holds[0] = to
            return t

        def fresh(cold: bool, fn, dropped):
            gc.collect()
            if cold:
                drop_cache(dropped)
            t, m = timed(lambda: forward(fn()))
            return t, m

        results = {}
        forward(model)
        for cold in (False, True):
            n = 1 if cold else args.repeats
            swaps = [swap_and_forward(cold) for _ in range(n)]
            dense_t, fresh_b = [], None
            for _ in range(n):
                fresh_b = None
                t, fresh_b = fresh(cold, lambda: LlamaForCausalLM.from_pretrained(dense_b), files_under(dense_b))
                dense_t.append(t)
            load_t = [fresh(cold, lambda: ken_dist.load_model(store, "b"), parts["b"] + base_files)[0]
                      for _ in range(n)]
            fwd_t = [timed(lambda: forward(model))[0] for _ in range(n)]
            results["cold" if cold else "warm"] = {k: statistics.median(v) for k, v in (
                ("swap", swaps), ("from_pretrained", dense_t), ("load_model", load_t), ("forward", fwd_t))}
        if holds[0] != "b":
            ken_dist.swap(model, store, holds[0], "b")
        s1, s2 = model.state_dict(), fresh_b.state_dict()
        exact = s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
        params = sum(t.numel() for t in s2.values())
        kept = sum(t["kept"] for t in ken_dist.open_subnetwork(store, "b").manifest()["tensors"].values())
        print(f"\n{params / 1e6:.0f}M params bf16, keep {args.keep}: a swap restores {kept / 1e6:.1f}M entries "
              f"and writes {kept / 1e6:.1f}M; torch threads {torch.get_num_threads()}; seconds until the model "
              f"answered one 16-token forward pass")
        print(f"{'operation':<36} {'warm':>8} {'cold':>8}")
        labels = (("swap", "swap a<->b (ken_dist.swap)"), ("from_pretrained", "from_pretrained(dense b)"),
                  ("load_model", "load_model(store, b)"), ("forward", "the forward pass alone"))
        for key, label in labels:
            print(f"{label:<36} {results['warm'][key]:>8.3f} {results['cold'][key]:>8.3f}")
        for which in ("warm", "cold"):
            r = results[which]
            print(f"{which}: swap / from_pretrained = {r['swap'] / r['from_pretrained']:.2f}")
        print(f"swapped model equals the fresh dense load bit for bit: {exact}")
        print(json.dumps({"params": params, "keep": args.keep, "kept": kept, "bit_exact": exact, **results}))
        return 0 if exact else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
