"""The README's recipe as a user runs it: `ken-dist prune`, `ken-dist materialize`, `from_pretrained`.

    python benchmarks/quality/cli_check.py --task reviews --seeds 0 1 2
    python benchmarks/quality/cli_check.py --strategy lowrank-delta-model --keep 0.25 --values sign
    python benchmarks/quality/cli_check.py --task reviews --seeds 0 1 2 --fit-texts 512

--fit-texts N adds `ken-dist fit-scales` between prune and materialize, on N training texts of the
task without their labels (the draw benchmarks/quality/fit_scales.py uses), the full fine-tune as
the teacher.

run.py measures every cell through the library (run_job, open_subnetwork); this check takes the
other road, independently of it: the CLI in a subprocess writes a fresh store, the CLI rebuilds a
dense Hugging Face directory, transformers loads it, and the test split is scored. Bits per
parameter count every file the fine-tune has in the store (parts, manifest, lock file; and the
job's journal, which stores written before finalize dropped it still have)
plus the store's own ken_store.json, over the parameter count read from the fine-tune's
safetensors header; the gap is to the full fine-tune loaded the same way in the same run.
The fine-tunes come from common.finetune (cached under cache/).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from common import CACHE, RESULTS, log  # noqa: E402


def stored_bytes(store: Path, name: str) -> int:
    files = [p for p in (store / "finetunes" / name).rglob("*") if p.is_file()] + [store / "ken_store.json"]
    return sum(p.stat().st_size for p in files)


def parameters(ft_dir: Path) -> int:
    """From the safetensors header alone (8-byte length, JSON): no library of ours involved."""
    with open(ft_dir / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = 0
    for key, info in header.items():
        if key != "__metadata__":
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


def score_dir(model_dir: Path) -> float:
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    common.set_threads()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir)
    _, _, test_x, test_y = common.load_split()
    return common.scores(common.predict(model, test_x, tok), test_y)["accuracy"]


def check(seed: int, strategy: str, keep: float, values: str, fit_texts: int = 0) -> dict:
    base = common.base_model_dir()
    ft = common.finetune(seed)
    work = CACHE / f"cli-check{common.task_suffix()}-s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    store, out, name = work / "store", work / "dense", f"{strategy}-keep{keep:g}-{values}"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cli = [sys.executable, "-m", "ken_dist.cli"]
    t0 = time.time()
    subprocess.run(cli + ["prune", str(base), str(ft), "--store", str(store), "--name", name, "--strategy", strategy,
                          "--keep", str(keep), "--values", values, "--map-prefix", "bert.=",
                          "--ignore-missing", r"^embeddings\.position_ids$", "--quiet"], check=True, env=env)
    if fit_texts:
        import numpy as np
        train_x = common.load_split()[0]
        pick = np.random.default_rng(1000 + seed).choice(len(train_x), fit_texts, replace=False)
        texts = work / "calib.txt"
        texts.write_text("".join(" ".join(train_x[i].split()) + "\n" for i in pick))
        t1 = time.time()
        subprocess.run(cli + ["fit-scales", str(store), "--finetune", name, "--texts", str(texts),
                              "--calib", str(fit_texts), "--seed", str(seed), "--quiet"], check=True, env=env)
        fit_seconds = round(time.time() - t1, 1)
        name_out = name + "-fit"
    else:
        name_out, fit_seconds = name, None
    subprocess.run(cli + ["materialize", str(store), "--finetune", name, "--out", str(out)], check=True, env=env)
    seconds = time.time() - t0
    full, pruned = score_dir(ft), score_dir(out)
    bits = 8 * stored_bytes(store, name) / parameters(ft)
    return {"task": common.TASK, "seed": seed, "recipe": name_out, "bits_per_param": bits, "accuracy": pruned,
            "full_accuracy": full, "gap_points": 100 * (pruned - full), "prune_materialize_seconds": round(seconds, 1),
            **({"fit_seconds": fit_seconds} if fit_texts else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentences", choices=list(common.TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--strategy", default="lowrank-delta-model")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--values", default="sign-g64")
    ap.add_argument("--fit-texts", type=int, default=0, help="run ken-dist fit-scales on this many unlabeled training texts")
    args = ap.parse_args(argv)
    common.set_task(args.task)
    rows = []
    for seed in args.seeds:
        row = check(seed, args.strategy, args.keep, args.values, args.fit_texts)
        log(json.dumps(row))
        rows.append(row)
        with open(RESULTS / "cli_check.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    print("\n| task | seed | recipe | bits/param | accuracy % | full fine-tune % | gap (points) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['seed']} | {r['recipe']} | {r['bits_per_param']:.3f} | {100 * r['accuracy']:.1f} | "
              f"{100 * r['full_accuracy']:.1f} | {r['gap_points']:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
