"""Read a subnetwork back: a lazy, safe_open-like view of the fine-tune it stands for.

`open_subnetwork(store, finetune)` gives `keys()`, `metadata()`, `get_tensor(name)` and
`get_slice(name)[a:b]`: a pruned tensor is the base tensor with the kept entries overwritten by
the stored fine-tuned values (bit-exact, same dtype and shape); a whole tensor is returned as
stored. Nothing is read until asked for, one tensor at a time, and every part is checked
against the sha256 in the manifest before it is trusted. The base checkpoint is found where
the manifest says (or where `base` says, when it moved: a directory, a .safetensors file or an
HF repo id in the local cache) and must be the very base the subnetwork was pruned against: its
safetensors headers and a sample of its tensor bytes must hash the same, or a KenError says so.
`get_slice(name)[a:b]` reads only the part files whose row blocks overlap a..b and only rows a..b
of the base (safetensors pread at the header's offsets): a row of a 70B model costs kilobytes.

`rows`, `base_rows` and `kept` are the row-level access switcher.py builds on (load_model,
apply, swap and Switcher write kept entries into a live model instead of building dense
tensors); a value codec plugs in here and in store/parts.py, and they all follow.

The base is found and verified by base.py; materialize.py writes the dense directory;
inspect.py reports sizes.
"""
from __future__ import annotations

import json

import torch

from ken_dist.checkpoints.dtypes import torch_dtype
from ken_dist.checkpoints.inventory import Checkpoint
from ken_dist.checkpoints.reads import read_rows, read_rows_array
from ken_dist.errors import CheckpointError, InputError, StoreError
from ken_dist.store.codecs import RAW
from ken_dist.store.parts import block_bitmasks, block_rows, decode_whole, put_kept
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.base import open_verified_base

__all__ = ["open_subnetwork", "Subnetwork"]


class _Slice:
    """`get_slice(name)[a:b]`: reads only rows a..b of the base and the parts that cover them."""

    def __init__(self, sub: "Subnetwork", name: str):
        self._sub, self._name, self._t = sub, name, sub.entry(name)

    def get_shape(self) -> list[int]:
        return list(self._t["shape"])

    def get_dtype(self) -> str:
        return self._t["dtype"]

    def __getitem__(self, key):
        shape = self._t["shape"]
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if len(shape) < 2 or self._t["action"] != "prune" or not (
                isinstance(first, int) or (isinstance(first, slice) and first.step in (None, 1))):
            return self._sub.get_tensor(self._name)[key]
        if isinstance(first, int):
            i = first + shape[0] if first < 0 else first
            if not 0 <= i < shape[0]:
                raise IndexError(f"row {first} out of range for tensor {self._name!r} of shape {shape}")
            return self._sub.rows(self._name, i, i + 1).reshape(shape[1:])[rest]
        a, b, _ = first.indices(shape[0])
        b = max(a, b)
        return self._sub.rows(self._name, a, b).reshape([b - a, *shape[1:]])[(slice(None), *rest)]


class Subnetwork:
    """The view returned by open_subnetwork; see the module docstring."""

    def __init__(self, store, finetune: str, base=None, *, verify: bool = True):
        self.store = store if isinstance(store, Store) else Store(store)
        self.finetune = finetune
        self.verify = verify
        self._manifest = self.store.manifest(finetune)
        if not self._manifest.get("complete"):
            raise StoreError(f"store {self.store.root}: fine-tune {finetune!r} is incomplete (its prune run "
                           f"was interrupted or is still running); rerun the same prune command to finish it")
        self._tensors = self._manifest["tensors"]
        self._base_arg = base
        self._base: Checkpoint | None = None
        if any(t["action"] == "prune" for t in self._tensors.values()):
            _ = self.base_checkpoint  # fail now, not at the first tensor, when the base is wrong

    # ---- the base checkpoint -----------------------------------------------------------------
    @property
    def base_checkpoint(self) -> Checkpoint:
        """The base, opened on first use and checked against the manifest (subnetwork/base.py)."""
        if self._base is None:
            try:
                self._base = open_verified_base(self._manifest, self._base_arg, self.finetune)
            except CheckpointError as exc:  # say which store's record led there
                raise CheckpointError(f"{exc} (fine-tune {self.finetune!r} of store {self.store.root})") from None
        return self._base

    # ---- safe_open-like surface --------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def metadata(self) -> dict[str, str]:
        """String metadata like safetensors': format, fine-tune, params and summary as JSON."""
        m = self._manifest
        return {"format": m["format"], "format_version": str(m["format_version"]), "finetune": self.finetune,
                "ken_dist_version": str(m.get("ken_dist_version")), "params": json.dumps(m["params"]),
                "summary": json.dumps(m.get("summary"))}

    def manifest(self) -> dict:
        return self._manifest

    def entry(self, name: str) -> dict:
        """The manifest entry of a tensor (shape, dtype, action, rows, row_len, base_name, blocks)."""
        try:
            return self._tensors[name]
        except KeyError:
            raise InputError(f"fine-tune {self.finetune!r} in store {self.store.root} has no tensor {name!r}; "
                           f"see keys() for the {len(self._tensors)} it holds") from None


    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.entry(name)
        if t["action"] == "whole":
            block = t["blocks"][0]
            table = self.store.read_part(block, name, verify=self.verify)
            try:
                return decode_whole(table, torch_dtype(t["dtype"]), t["shape"])
            except ValueError as e:
                raise StoreError(f"part file {self.store.resolve(block['file'])} of tensor {name!r} is "
                               f"inconsistent ({e}); delete it and rerun the prune command") from None
        return self.rows(name, 0, t["rows"]).reshape(t["shape"])

    # ---- row access (also used to write into a live model, switcher.py) ---------------------
    def base_rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the base of pruned tensor `name` as [b - a, row_len]; reads only them."""
        t = self.entry(name)
        return read_rows(self.base_checkpoint.tensors[t["base_name"]], a, b)

    def _decode_part(self, name: str, block: dict, decoder, *ranges, threads: bool = True, path: str | None = None,
                     table=None):
        """decoder(table, ...) over one part of pruned tensor `name` (parts.block_rows or
        block_bitmasks), its codec's base rows at hand, a ValueError named as a StoreError.
        threads, path: as for Store.read_part; table: the part's table when the caller holds it."""
        t = self.entry(name)
        path = path or self.store.resolve(block["file"])
        if table is None:
            table = self.store.read_part(block, name, verify=self.verify, threads=threads, path=path)
        base_info = self.base_checkpoint.tensors[t["base_name"]] if "values" in block else None
        try:
            yield from decoder(table, t["row_len"], t["dtype"], block["row_start"], block["row_end"], *ranges,
                               codec=block.get("values", RAW), index=block.get("index", "mask"),
                               base_rows=lambda lo, hi: read_rows_array(base_info, lo, hi))
        except ValueError as e:
            raise StoreError(f"part file {path} of tensor {name!r} is "
                             f"inconsistent ({e}); delete it and rerun the prune command") from None

    def kept(self, name: str, a: int = 0, b: int | None = None):
        """Yield (first_row, keep [m, row_len] bool numpy, values uint8 numpy) for the kept entries
        of rows [a, b) of a pruned tensor, reading only the parts whose blocks overlap them.
        values are the kept entries' bytes in the tensor's dtype as the block's codec rebuilds
        them (store/parts.block_rows): the fine-tuned bytes for raw, base + decoded delta else."""
        t = self.entry(name)
        b = t["rows"] if b is None else b
        for block in t["blocks"]:
            if block["row_end"] > a and block["row_start"] < b:
                yield from self._decode_part(name, block, block_rows, a, b)

    def kept_in_table(self, name: str, block: dict, table):
        """kept()'s output for every row of `table`, a part of pruned tensor `name` standing in for
        `block`'s file (fit_scales decodes a rescaled part before it replaces the stored one)."""
        yield from self._decode_part(name, block, block_rows, table=table)

    def bitmasks(self, name: str, block: dict, path: str | None = None):
        """Yield (first_row, packed [m, ceil(row_len/8)] uint8 bitmask, values uint8 numpy) for every
        row of one part of a pruned tensor (store/parts.block_bitmasks: the stored bitmask as it is).
        For callers that decode parts in their own threads (Arrow's are not used); path: as for
        Store.read_part."""
        yield from self._decode_part(name, block, block_bitmasks, threads=False, path=path)

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of a pruned tensor as [b - a, row_len]: base rows + kept fine-tuned entries."""
        t = self.entry(name)
        if t["action"] != "prune":
            return self.get_tensor(name).reshape(t["rows"], t["row_len"])[a:b]
        out = self.base_rows(name, a, b).clone()
        for first, keep, values in self.kept(name, a, b):
            put_kept(out[first - a: first - a + keep.shape[0]], keep, values)
        return out



def open_subnetwork(store, finetune: str, base=None, *, verify: bool = True) -> Subnetwork:
    """A context manager like safetensors.safe_open over a stored fine-tune (see module doc).

    base: where the base checkpoint is now, when it moved since pruning: a directory, one
    .safetensors file, or an HF repo id ("org/name" or "org/name@revision") found in the local
    HF cache (offline). By default the manifest's root, then its repo id at its revision."""
    return Subnetwork(store, finetune, base, verify=verify)
