"""Check one decoder layer of a pruned store bit for bit against KEN recomputed from the files.

For every tensor of layer L (1-D tensors are one row), the store's reconstruction
`open_subnetwork(store, name).get_tensor(t)` must equal `torch.where(ken_select(ft, keep), ft, base)`
with ft and base read straight from the checkpoints. Used for the scale runs of docs/performance.md:

    python benchmarks/verify_layer.py /tmp/k7b/store ft /tmp/k7b/base /tmp/k7b/finetune --layer 17
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from ken_dist import ken_select, open_subnetwork
from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.checkpoints.reads import read_tensor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("name", help="the fine-tune's name in the store")
    ap.add_argument("base")
    ap.add_argument("finetune")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--keep", type=float, default=0.25, help="the keep the store was pruned with")
    args = ap.parse_args(argv)
    base, ft = open_checkpoint(args.base), open_checkpoint(args.finetune)
    t0 = time.time()
    with open_subnetwork(args.store, args.name) as sub:
        names = [n for n in sub.keys() if f".layers.{args.layer}." in n]
        if not names:
            print(f"no tensor of layer {args.layer} in the store", file=sys.stderr)
            return 2
        bad = 0
        for n in names:
            f, b = read_tensor(ft.tensors[n]), read_tensor(base.tensors[n])
            want = torch.where(ken_select(f, keep=args.keep), f, b)
            got = sub.get_tensor(n)
            ok = got.dtype == want.dtype and got.shape == want.shape and torch.equal(
                got.view(torch.uint8) if got.dim() else got, want.view(torch.uint8) if want.dim() else want)
            bad += not ok
            print(f"{n} {list(got.shape)}: {'bit-exact' if ok else 'MISMATCH'}", flush=True)
    print(f"layer {args.layer}: {len(names) - bad} of {len(names)} tensors bit-exact ({time.time() - t0:.1f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
