"""Switching one model between 8 stored fine-tunes: the resident switcher against its limits and
against loading each dense fine-tune afresh.

Measured side by side in one run (contenders alternated inside each cycle), on a generated
Llama-shaped bf16 base of about 1.06B parameters (default shape) with 8 fine-tunes (base + seeded
noise, 10x on 5% of rows; random masks at the keep, one store per keep), for keep 0.25 and keep
0.1:
  resident          Switcher.use(next) with every cycled fine-tune resident (--resident of them
                    fit the memory this shared machine allows; the cycle goes through those)
  bare scatter      the limit: index_copy_ of the same entries (base values at the current task's
                    indices, then the next task's values) from preallocated int64 indices and
                    values, no bookkeeping
  cold (cache)      Switcher.use(next) with nothing resident (budget 0): read, sha256-check and
                    decode the next fine-tune's parts (page cache warm), then the switch
  cold (dropped)    the same after posix_fadvise(DONTNEED) on the next fine-tune's part files
                    (for both: the CPU seconds the process spent in it, all threads, too: steadier
                    than the wall time on a shared machine)
  read bytes        the limit of the cold path's I/O: reading the same part files (cache warm /
                    dropped), with no decode; and (cache warm) reading + sha256 of them, the
                    check against the manifest the cold path makes
  from_pretrained   LlamaForCausalLM.from_pretrained(dense fine-tune) until it answers one
                    16-token forward pass (the dense fine-tunes are the generated checkpoints
                    the store was pruned from: same size and layout as a materialized one),
                    alternately with its files read into the page cache first (the target's
                    reference) and evicted first (a load from disk)
and the resident memory of each fine-tune against its stored bytes. Every switched model is
checked bit for bit against the stored fine-tune (the lazy view's get_tensor) at the end.

Preparation (generating and pruning) is cached under benchmarks/results/tmp/switch_speed/<shape>/
(gitignored) and skipped on a rerun; its time is printed.

    python benchmarks/switch_speed.py                                  # 1.06B, keep 0.25 and 0.1
    python benchmarks/switch_speed.py --hidden 1792 --layers 24 --intermediate 4864  # another shape
    python benchmarks/switch_speed.py --only-cold      # only the cold switch and its limits
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from store_helpers import prune_into  # noqa: E402

import ken_dist  # noqa: E402
from ken_dist.checkpoints.inventory import open_checkpoint  # noqa: E402
from ken_dist.store.protocol import Store  # noqa: E402
from ken_dist.testing.synthetic import LlamaShape, write_checkpoint  # noqa: E402

CACHE = Path(__file__).resolve().parent / "results" / "tmp" / "switch_speed"
FINETUNES = 8


def perturbed_finetune(base: Path, out: Path, seed: int) -> Path:
    """base + N(0, 0.002) everywhere, 10x on 5% of rows: another task tuned from the same base,
    written shard by shard (one shard in memory at a time)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(base.iterdir()):
        if f.suffix == ".safetensors":
            tensors = {}
            for name, t in load_file(f).items():
                x = t.float()
                delta = torch.randn(x.shape, generator=gen).mul_(0.002)
                if x.dim() > 1:
                    delta[torch.rand(x.shape[0], generator=gen) < 0.05] *= 10
                tensors[name] = x.add_(delta).to(t.dtype)
                del x, delta
            save_file(tensors, tmp / f.name, metadata={"format": "pt"})
        elif f.is_file():
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(out)
    return out


def prepare(shape: LlamaShape, keeps) -> tuple[Path, dict]:
    """The base, 8 dense fine-tunes and one store per keep, generated once and cached. The stores
    are written through the Store API with random masks (tests/store_helpers.prune_into, the
    driver's protocol without Ray): which entries are kept does not change what a switch costs,
    and a Ray job of 16 x 1B prunes does not fit this shared 2-core machine's afternoon."""
    root = CACHE / f"h{shape.hidden}-i{shape.intermediate}-l{shape.layers}-v{shape.vocab}"
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    t0 = time.perf_counter()
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        write_checkpoint(root / "base.partial", shape, dtype="bf16", seed=0, shard_bytes=256 * 2**20, threads=2)
        (root / "base.partial").rename(base)
    print(f"base ready after {time.perf_counter() - t0:.0f} s", flush=True)
    fts = {}
    for i in range(FINETUNES):
        fts[f"task{i}"] = root / f"task{i}"
        if not (fts[f"task{i}"] / "config.json").exists():
            perturbed_finetune(base, fts[f"task{i}"], seed=100 + i)
            print(f"fine-tune task{i} ready after {time.perf_counter() - t0:.0f} s", flush=True)
    stores = {}
    for keep in keeps:
        store = root / f"store-keep{keep}"
        stores[keep] = store
        if (store / "done").exists():
            continue
        shutil.rmtree(store, ignore_errors=True)
        base_names = set(open_checkpoint(str(base)).tensors)
        for i, (name, path) in enumerate(fts.items()):
            ft = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
            prune_into(store, name, ft, str(base), str(path), keep=keep, block_rows=1024, seed=i,
                       base_names=base_names, params={"k": None, "keep": keep, "strategy": "random",
                                                      "compat": "index", "seed": i})
            del ft
        (store / "done").write_text("")
        print(f"store keep {keep} ready after {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"preparation took {time.perf_counter() - t0:.0f} s (0 when cached)", flush=True)
    return base, {"finetunes": fts, "stores": stores}


def drop_cache(paths) -> None:
    """Evict these files' pages from the page cache (clean pages not mapped by a live process)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bytes(paths, workers: int, sha256: bool = False) -> int:
    """Read whole files in `workers` threads, as the cold path does: the I/O limit (sha256: and
    hash them, as the cold path's check against the manifest does)."""
    def one(path):
        with open(path, "rb") as f:
            data = f.read()
        if sha256:
            hashlib.sha256(data).hexdigest()
        return len(data)
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, paths))


def process_cpu() -> float:
    """CPU seconds this process has used, all threads (user + system): the work a cold switch does,
    which a shared machine's load inflates less than its wall time."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _index(e, scratch) -> torch.Tensor:
    """e's flat positions as int64 on scratch's device (every entry for a tensor stored whole)."""
    return torch.arange(scratch.numel(), device=scratch.device) if e.whole else e.positions(scratch.device)


@torch.no_grad()
def bare_scatter(model, prev, nxt, sync=lambda: None) -> float:
    """The limit of one switch prev -> nxt: per tensor, index_copy_ of the base values at prev's
    entries and of nxt's values at its entries into a copy of the tensor, from preallocated int64
    indices and values on the tensor's device; only the two scatters are timed (sync: waits for
    the device)."""
    tensors = dict(model.named_parameters())
    total = 0.0
    for target in dict.fromkeys([*(prev.tensors if prev else ()), *nxt.tensors]):
        scratch = tensors[target].data.view(-1).clone()
        steps = []
        if prev is not None and target in prev.tensors:
            idx = _index(prev.tensors[target], scratch)
            steps.append((idx, scratch.index_select(0, idx)))  # stands in for the saved base values
        if target in nxt.tensors:
            e = nxt.tensors[target]
            steps.append((_index(e, scratch), e.values.to(scratch.device)))
        sync()
        t0 = time.perf_counter()
        for idx, values in steps:
            scratch.index_copy_(0, idx, values)
        sync()
        total += time.perf_counter() - t0
        del scratch, steps
    return total


def forward(model, ids):
    with torch.no_grad():
        model(input_ids=ids)


def check_exact(model, store, name: str) -> bool:
    """Every tensor of the switched model against the stored fine-tune (the lazy view)."""
    params = dict(model.named_parameters())
    with ken_dist.open_subnetwork(store, name) as sub:
        return all(torch.equal(params[k].data, sub.get_tensor(k)) for k in sub.keys() if k in params)


def measure(base: Path, store: Path, fts: dict, keep: float, args) -> dict:
    from transformers import LlamaForCausalLM
    names = list(fts)
    workers = min(8, os.cpu_count() or 1)
    parts = {n: [str(store / b["file"]) for t in Store(store).manifest(n)["tensors"].values() for b in t["blocks"]]
             for n in names}
    ids = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    model = LlamaForCausalLM.from_pretrained(base)
    switcher = ken_dist.Switcher(model, store)
    resident = [] if args.only_cold else names[: args.resident]
    for n in resident:  # first writes also pay the copy-on-write of the memory-mapped base pages
        switcher.use(n)
    forward(model, ids)
    rows = {k: [] for k in ("resident", "bare", "cold_cache", "cold_dropped", "read_cache", "read_dropped", "hash_cache",
                            "from_pretrained", "from_pretrained_dropped", "forward", "cold_cpu_cache",
                            "cold_cpu_dropped")}
    for i in range(args.cycles * len(resident)):  # resident switch and its bare scatter, alternated
        prev = switcher._residents[switcher.active]
        nxt_name = resident[(resident.index(switcher.active) + 1) % len(resident)]
        t, _ = timed(lambda: switcher.use(nxt_name))
        rows["resident"].append(t)
        rows["bare"].append(bare_scatter(model, prev, switcher._residents[nxt_name]))
        rows["forward"].append(timed(lambda: forward(model, ids))[0])
    mem = switcher.memory()
    for step, nxt_name in enumerate(names * args.cold_rounds):  # cold: nothing of the next one resident
        if step < len(names) and not args.only_cold:  # from_pretrained of each dense fine-tune once, until it answers
            gc.collect()
            dense = [str(f) for f in Path(fts[nxt_name]).iterdir() if f.suffix == ".safetensors"]
            cached = step % 2 == 0  # the reference: the files in the page cache (a memory map is nearly free)
            if cached:
                read_bytes(dense, workers)
            else:
                drop_cache(dense)
            t, _ = timed(lambda: forward(LlamaForCausalLM.from_pretrained(fts[nxt_name]), ids))
            rows["from_pretrained" if cached else "from_pretrained_dropped"].append(t)
            gc.collect()
        if nxt_name == switcher.active:
            continue
        dropped = step % 2 == 1
        prev = switcher._residents[switcher.active] if switcher.active else None
        for n in switcher.resident():
            if n != switcher.active:
                switcher.evict(n)
        gc.collect()
        if dropped:
            drop_cache(parts[nxt_name])
        else:
            read_bytes(parts[nxt_name], workers)
        cpu0 = process_cpu()
        t, _ = timed(lambda: switcher.use(nxt_name))
        rows["cold_dropped" if dropped else "cold_cache"].append(t)
        rows["cold_cpu_dropped" if dropped else "cold_cpu_cache"].append(process_cpu() - cpu0)
        nxt = switcher._residents[nxt_name]
        rows["bare_cold"] = rows.get("bare_cold", []) + [bare_scatter(model, prev, nxt)]
        if dropped:
            drop_cache(parts[nxt_name])
        rows["read_dropped" if dropped else "read_cache"].append(timed(lambda: read_bytes(parts[nxt_name], workers))[0])
        if not dropped:
            rows["hash_cache"].append(timed(lambda: read_bytes(parts[nxt_name], workers, sha256=True))[0])
    if args.only_cold:  # the fine-tune the cold cycle ended in, in the form its switch left it
        mem = switcher.memory()
    exact = check_exact(model, store, switcher.active) if switcher.active else True
    switcher.base()
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    res = mem["finetunes"]
    per_ft = statistics.median(r["bytes"] / r["stored_bytes"] for r in res.values())
    entries = statistics.median(r["entries"] for r in res.values())
    return {"keep": keep, "median_s": med, "samples": {k: len(v) for k, v in rows.items()},
            "resident_bytes": statistics.median(r["bytes"] for r in res.values()),
            "stored_bytes": statistics.median(r["stored_bytes"] for r in res.values()),
            "memory_ratio": per_ft, "entries": entries, "saved_base_bytes": mem["saved_base_bytes"],
            "forms": next(iter(res.values()))["forms"], "bit_exact": exact,
            "params": sum(p.numel() for p in model.parameters())}


def _measured(ratio) -> bool:
    """Whether this run measured what the ratio needs (--only-cold leaves some out)."""
    try:
        ratio()
    except KeyError:
        return False
    return True


def report(r: dict) -> None:
    m = r["median_s"]
    print(f"\nkeep {r['keep']}: {r['params'] / 1e9:.2f}B params bf16, {r['entries'] / 1e6:.0f}M kept entries per "
          f"fine-tune; torch threads {torch.get_num_threads()}; medians in seconds (samples)")
    for key, label in (("resident", "resident switch (Switcher.use)"), ("bare", "  bare scatter, same entries"),
                       ("cold_cache", "cold switch, page cache warm"), ("cold_dropped", "cold switch, files dropped"),
                       ("cold_cpu_cache", "  CPU seconds (all threads) of it, cache warm"),
                       ("cold_cpu_dropped", "  CPU seconds (all threads) of it, dropped"),
                       ("bare_cold", "  bare scatter of those switches"),
                       ("read_cache", "  read the stored bytes, cache warm"),
                       ("read_dropped", "  read the stored bytes, dropped"),
                       ("hash_cache", "  read + sha256 the stored bytes, cache warm"),
                       ("from_pretrained", "from_pretrained(dense) + forward, files cached"),
                       ("from_pretrained_dropped", "from_pretrained(dense) + forward, dropped"),
                       ("forward", "forward pass alone")):
        if key in m:
            print(f"  {label:<40} {m[key]:>8.3f}  ({r['samples'][key]})")
    cold_limit = lambda kind: m["read_" + kind] + m["bare_cold"]  # noqa: E731
    ratios = {
        "resident / bare scatter (target <= 2)": lambda: m["resident"] / m["bare"],
        "cold (cache warm) / (read + bare) (target <= 2)": lambda: m["cold_cache"] / cold_limit("cache"),
        "cold (dropped) / (read + bare) (target <= 2)": lambda: m["cold_dropped"] / cold_limit("dropped"),
        "resident memory / stored bytes (target <= 1.5)": lambda: r["memory_ratio"],
        "from_pretrained+forward (cached) / resident switch (target >= 5)": lambda: m["from_pretrained"] / m["resident"],
        "from_pretrained+forward (dropped) / resident switch": lambda: m["from_pretrained_dropped"] / m["resident"],
        "from_pretrained+forward (cached) / (resident switch + forward)":
            lambda: m["from_pretrained"] / (m["resident"] + m["forward"]),
    }
    ratios = {k: ratio() for k, ratio in ratios.items() if _measured(ratio)}
    for k, v in ratios.items():
        print(f"  {k:<58} {v:6.2f}")
    print(f"  resident fine-tune {r['resident_bytes'] / 2**20:.0f} MiB vs {r['stored_bytes'] / 2**20:.0f} MiB stored; "
          f"positions kept as {r['forms']} (tensors per form); saved base values "
          f"{r['saved_base_bytes'] / 2**20:.0f} MiB per model; bit exact: {r['bit_exact']}")
    r["ratios"] = ratios


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.1])
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--resident", type=int, default=3, help="fine-tunes kept resident for the resident cycle")
    p.add_argument("--cycles", type=int, default=3, help="rounds through the resident ones")
    p.add_argument("--cold-rounds", type=int, default=1, help="rounds through all 8 for the cold switch")
    p.add_argument("--only-cold", action="store_true", help="only the cold switch and its limits (quick iteration)")
    args = p.parse_args()
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                       heads=max(1, args.hidden // 128), kv_heads=max(1, args.hidden // 128))
    warnings.simplefilter("ignore")
    base, prep = prepare(shape, args.keep)
    if args.prepare_only:
        return 0
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    results = []
    for keep in args.keep:
        results.append(measure(base, prep["stores"][keep], prep["finetunes"], keep, args))
        report(results[-1])
        gc.collect()
    print(json.dumps(results))
    return 0 if all(r["bit_exact"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
