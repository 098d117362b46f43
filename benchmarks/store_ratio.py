"""Stored bytes of one pruned block vs the information bound, and write/read speed.

    python benchmarks/store_ratio.py                       # bf16 [4096, 4096], keep 0.01..0.5
    python benchmarks/store_ratio.py --rows 512 --keep 0.25 0.5 --dtype F16
    python benchmarks/store_ratio.py --values raw int8 int4 int2 sign --keep 0.01 0.05 0.25 1.0

With a lossy --values codec the bound counts the codes' bits instead of the values' bytes (the
scales aside) and the values are normal fine-tuned = base + N(0, 0.01^2) deltas. "index" says
which index coding the writer picked for the part (bitmask or delta-packed positions), bits/param
is 8 x part bytes / (rows x cols).

The bound of a row is kept*itemsize + log2 C(n, kept)/8 bytes: the values themselves plus the
least any encoding of *which* entries were kept can spend. Stored bytes are the whole part
file (Parquet footer included). "random bits" values are incompressible (the honest case for
the bound); "normal" values are bf16-rounded N(0, 1), whose exponent bytes zstd can squeeze,
so their ratio may drop below 1. Masks are uniform random with the given keep fraction.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ken_dist.checkpoints.dtypes import storage_bits, torch_dtype  # noqa: E402
from ken_dist.store.codecs import parse_codec  # noqa: E402
from ken_dist.store.parts import apply_block, info_bound_bytes  # noqa: E402
from ken_dist.store.protocol import Store  # noqa: E402
from ken_dist.subnetwork.view import Subnetwork  # noqa: E402,F401  (import cost paid before timing)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F16", "F32", "F64"])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.01, 0.1, 0.25, 0.5])
    ap.add_argument("--values", nargs="+", default=["raw"], help="value codecs (ken_dist.store.codecs)")
    args = ap.parse_args(argv)
    dtype = torch_dtype(args.dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    kinds = {
        "random bits": torch.randint(0, 256, (*shape, itemsize), dtype=torch.uint8, generator=gen)
        .view(dtype).reshape(shape),
        "normal": torch.randn(shape, generator=gen).to(dtype),
    }
    base = kinds["normal"]
    tuned = (base.float() + 0.01 * torch.randn(shape, generator=gen)).to(dtype)
    print(f"{args.dtype} {list(shape)}; ratio = part file bytes / information bound")
    print(f"{'keep':>6} {'codec':>8} {'values':>12} {'index':>9} {'stored':>12} {'bound':>12} {'ratio':>7} "
          f"{'bits/param':>10} {'write s':>8} {'read s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "store"), create=True)
        store.begin("bench", params={}, base_identity={}, finetune_identity={}, tensors={})
        for keep in args.keep:
            mask = torch.rand(shape, generator=gen) < keep
            for spec in args.values:
                codec = parse_codec(spec)
                bound = info_bound_bytes(mask.sum(1).numpy(), args.cols, itemsize, codec.bits)
                for kind, values in ({"fine-tuned": tuned} if codec.lossy else kinds).items():
                    t0 = time.perf_counter()
                    rec = store.write_block("bench", "w", 0, args.rows, mask, values, codec=codec, base=base)
                    t1 = time.perf_counter()
                    target = base.clone()
                    apply_block(store.read_part(rec, "w"), target, 0, args.rows, codec=rec.get("values", "raw"),
                                index=rec.get("index", "mask"), base_rows=lambda a, b: storage_bits(base[a:b])[0])
                    t2 = time.perf_counter()
                    if not codec.lossy:
                        assert torch.equal(target[mask].view(torch.uint8), values[mask].view(torch.uint8)), \
                            "not bit-exact"
                    print(f"{keep:>6} {spec:>8} {kind:>12} {rec.get('index', 'mask'):>9} {rec['bytes']:>12,} "
                          f"{bound:>12,.0f} {rec['bytes'] / bound:>7.4f} {8 * rec['bytes'] / mask.numel():>10.4f} "
                          f"{t1 - t0:>8.3f} {t2 - t1:>7.3f}")


if __name__ == "__main__":
    main()
