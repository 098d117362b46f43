"""Where a cold switch's decoding goes, stage by stage, over one stored fine-tune's part files.

    python benchmarks/cold_decode.py benchmarks/results/tmp/switch_speed/h2304-i6144-l14-v32000/store-keep0.1 task3

One thread, page cache warm (the files are read once before timing), CPU seconds per stage over
every part of the fine-tune: reading the files, sha256 of them (the check against the manifest),
Parquet decoding of all columns and of the bitmask and values columns apart, the bitmask copy
(store.parts.block_bitmasks). Then one part rewritten with other Parquet compressions: its size
and the time to decode it, against the stored file: what the cold switch would gain, and the
store lose, without zstd. Run it after switch_speed.py, which prepares such stores.
"""
from __future__ import annotations

import argparse
import hashlib
import time

import pyarrow as pa
import pyarrow.parquet as pq

from ken_dist.store.parts import PARQUET_OPTIONS, block_bitmasks
from ken_dist.store.protocol import Store


def cpu(label: str, fn, width: int = 36):
    c = time.process_time()
    out = fn()
    print(f"  {label:{width}s} {time.process_time() - c:7.3f} CPU s", flush=True)
    return out


def decode_all(datas: list[bytes], **kw) -> None:
    for d in datas:
        pq.ParquetFile(pa.py_buffer(d)).read(use_threads=False, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("finetune")
    ap.add_argument("--repeat", type=int, default=50, help="decodes of the sample part per compression")
    args = ap.parse_args()
    store = Store(args.store)
    m = store.manifest(args.finetune)
    blocks = [(t, b) for t in m["tensors"].values() for b in t["blocks"]]
    paths = [store.resolve(b["file"]) for _, b in blocks]
    datas = [open(p, "rb").read() for p in paths]
    decode_all(datas)  # the memory pool's first growth is not the decoder's cost
    total = sum(len(d) for d in datas)
    print(f"{args.finetune}: {len(datas)} parts, {total / 2**20:.0f} MiB; one thread, CPU seconds:")
    cpu("read the files", lambda: [open(p, "rb").read() for p in paths])
    cpu("sha256", lambda: [hashlib.sha256(d).digest() for d in datas])
    cpu("Parquet decode, all columns", lambda: decode_all(datas))  # each table dropped, as the cold path does
    index = "positions" if any(b.get("index") == "positions" for _, b in blocks) else "mask"
    cpu("  values column alone", lambda: decode_all(datas, columns=["values"]))
    cpu(f"  {index} column alone", lambda: decode_all(datas, columns=[index]))
    tables = [pq.ParquetFile(pa.py_buffer(d)).read(use_threads=False) for d in datas]

    def copy_bitmasks():
        for (t, b), table in zip(blocks, tables):
            if t["action"] == "prune":
                for _ in block_bitmasks(table, t["row_len"], t["dtype"], b["row_start"], b["row_end"],
                                        codec=b.get("values", "raw"), index=b.get("index", "mask"), base_rows=None):
                    pass
    cpu("bitmask copy (block_bitmasks)", copy_bitmasks)

    i = max(range(len(datas)), key=lambda j: len(datas[j]))
    options = {k: v for k, v in PARQUET_OPTIONS.items() if k not in ("compression", "compression_level")}
    if index == "positions":
        options["column_encoding"] = dict(options["column_encoding"], **{"positions.list.element": "DELTA_BINARY_PACKED"})
    print(f"the largest part ({len(datas[i]) / 2**10:.0f} KiB), rewritten, decoded {args.repeat}x:")
    variants = [("stored (zstd level 1)", datas[i])]
    for codec in ("none", "lz4", "snappy"):
        out = pa.BufferOutputStream()
        pq.write_table(tables[i], out, compression=codec, **options)
        variants.append((codec, out.getvalue().to_pybytes()))
    for label, data in variants:
        t = time.perf_counter()
        for _ in range(args.repeat):
            pq.ParquetFile(pa.py_buffer(data)).read(use_threads=False)
        ms = (time.perf_counter() - t) / args.repeat * 1e3
        print(f"  {label:24s} {len(data) / len(datas[i]):5.2f}x the stored size, {ms:6.2f} ms a decode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
