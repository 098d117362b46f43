"""Which tensors carry a pruned fine-tune's accuracy loss: put one group of them back to the full
fine-tune at a time and score the test split.

    python benchmarks/quality/cli_check.py --task uncertainty --seeds 2 --values raw   # writes the dense dir
    python benchmarks/quality/restore_groups.py --task uncertainty --seed 2

--dense is a directory `ken-dist materialize` wrote (default: the one cli_check.py left for that
task and seed). Groups: 1-D tensors (LayerNorm, biases), embeddings, pooler, attention matrices,
feed-forward matrices. A group whose restoration closes most of the gap is where the selection
spends too little.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

GROUPS = {
    "1-D (LayerNorm, biases)": lambda name, t: t.dim() == 1,
    "embeddings": lambda name, t: "embeddings" in name,
    "pooler": lambda name, t: "pooler" in name,
    "attention matrices": lambda name, t: t.dim() == 2 and "attention" in name,
    "feed-forward matrices": lambda name, t: t.dim() == 2 and ("intermediate" in name
                                                               or ("output" in name and "attention" not in name)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sentences", choices=list(common.TASKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense", type=Path, default=None)
    args = ap.parse_args(argv)
    common.set_task(args.task)
    common.set_threads()
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    ft = common.finetune(args.seed)
    dense = args.dense or common.CACHE / f"cli-check{common.task_suffix()}-s{args.seed}" / "dense"
    if not (dense / "model.safetensors").exists():
        raise SystemExit(f"no model.safetensors in {dense}: run cli_check.py for this task and seed first, or --dense")
    full, pruned = load_file(str(ft / "model.safetensors")), load_file(str(dense / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(ft)
    _, _, test_x, test_y = common.load_split()

    def accuracy(state: dict) -> float:
        model = BertForSequenceClassification.from_pretrained(ft)
        model.load_state_dict(state, strict=False)
        return common.scores(common.predict(model, test_x, tok), test_y)["accuracy"]

    a_full, a_pruned = accuracy(full), accuracy(pruned)
    print(f"{args.task} seed {args.seed}: full fine-tune {100 * a_full:.1f}%, pruned ({dense}) {100 * a_pruned:.1f}%")
    print("| restored to the full fine-tune | parameters | accuracy % | gap closed (points) |\n|---|---|---|---|")
    for label, member in GROUPS.items():
        names = [n for n in pruned if member(n, full[n])]
        state = {n: (full[n] if n in names else t) for n, t in pruned.items()}
        a = accuracy(state)
        print(f"| {label} | {sum(full[n].numel() for n in names):,} | {100 * a:.1f} | {100 * (a - a_pruned):+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
