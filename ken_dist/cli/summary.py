"""What the CLI prints after work: sizes in human units and the closing summary of a prune."""
from __future__ import annotations

import sys

from ken_dist.subnetwork.inspect import inspect_store


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def ratio_text(value) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


def print_summary(store_path: str, names: list[str], seconds: float, stream=None) -> None:
    stream = stream or sys.stdout
    report = inspect_store(store_path)
    for name in names:
        ft = report["finetunes"][name]
        if "error" in ft:
            print(f"fine-tune {name!r}: cannot be summarised: {ft['error']}", file=stream)
            continue
        print(f"fine-tune {name!r}: {ft['tensors_pruned']} tensors pruned, {ft['tensors_whole']} stored whole; "
              f"kept {ft['kept_params']:,} of {ft['pruned_params']:,} pruned weights "
              f"({100 * ft['kept_params'] / max(1, ft['pruned_params']):.1f}%)", file=stream)
        print(f"  stored {human_bytes(ft['stored_bytes'])} = {ft['stored_bytes'] / max(1, ft['dense_bytes']):.3f} x the dense "
              f"fine-tune ({human_bytes(ft['dense_bytes'])}), {ft['bits_per_param'] or 0:.3f} bits per parameter "
              f"(values {ft['values']}); pruned part {ratio_text(ft['bound_ratio'])} x the information bound",
              file=stream)
    print(f"store: {store_path}   time: {seconds:.1f} s", file=stream)
