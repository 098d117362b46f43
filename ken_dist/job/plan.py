"""The job plan: which fine-tunes, which tensors, which row blocks, with what parameters.

Built from checkpoint headers only and validated completely before any block runs, so a bad
k, a missing tensor or a shape mismatch is reported in seconds, not after hours of work.
A work unit is a descriptor (files, tensor names, row range): tensor bytes never travel with it.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

from ken_dist.checkpoints.inventory import Checkpoint, TensorInfo
from ken_dist.errors import InputError, KenError
from ken_dist.job.match import match_checkpoints
from ken_dist.kernel import COMPAT_MODES, STRATEGIES
from ken_dist.kernel.rows import resolve_k
from ken_dist.store.codecs import Codec, parse_codec

DEFAULT_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class PruneParams:
    """How one fine-tune is pruned; recorded in the store's manifest and compared on resume."""
    strategy: str = "ken"
    k: int | None = None
    keep: float | None = None
    compat: str = "index"
    seed: int = 0
    values: str = "raw"  # value codec of the kept entries (ken_dist.store.codecs)

    def validate(self, where: str) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"{where}: unknown strategy {self.strategy!r}; choose one of: "
                           f"{', '.join(sorted(STRATEGIES))}")
        if self.compat not in COMPAT_MODES:
            raise InputError(f"{where}: compat must be one of {', '.join(COMPAT_MODES)}, got {self.compat!r}")
        if self.compat == "reference" and self.strategy != "ken":
            raise InputError(f"{where}: compat 'reference' applies to strategy 'ken' only")
        try:
            resolve_k(1 << 30, self.k, self.keep)
        except KenError as exc:
            raise InputError(f"{where}: {exc}") from None
        try:
            parse_codec(self.values)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None

    @property
    def codec(self) -> Codec:
        return parse_codec(self.values)

    def as_dict(self) -> dict:
        """The manifest's params; `values` only when not raw, so raw stores keep version 1's params."""
        out = asdict(self)
        if self.values == "raw":
            del out["values"]
        return out


@dataclass(frozen=True)
class FineTuneSpec:
    """One fine-tune of the job: a name in the store, a checkpoint, its parameters."""
    name: str
    checkpoint: Checkpoint
    params: PruneParams


@dataclass(frozen=True)
class WorkUnit:
    finetune: str
    tensor: str
    action: str                 # "prune" or "whole"
    ft_info: TensorInfo
    base_info: TensorInfo | None
    row_start: int
    row_end: int
    params: PruneParams
    seed: int                   # per-tensor seed for seeded strategies
    budget: int | None = None   # entries to keep in this block (strategies of scope "model" only)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.tensor, self.row_start, self.row_end)

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def elements(self) -> int:
        return self.rows * self.ft_info.row_geometry[1]


@dataclass
class FineTunePlan:
    spec: FineTuneSpec
    tensors: dict[str, dict] = field(default_factory=dict)  # manifest tensor entries
    units: list[WorkUnit] = field(default_factory=list)


def row_blocks(info: TensorInfo, block_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of about block_bytes each (at least one row per block)."""
    rows, row_len = info.row_geometry
    row_bytes = max(1, row_len * max(1, info.itemsize))
    per_block = max(1, block_bytes // row_bytes)
    return [(a, min(rows, a + per_block)) for a in range(0, rows, per_block)]


def tensor_seed(seed: int, tensor: str) -> int:
    """Different tensors get different random patterns, reproducibly."""
    return (seed * 1_000_003 + zlib.crc32(tensor.encode())) % 2**63


def plan_finetune(base: Checkpoint, spec: FineTuneSpec, *, block_bytes: int = DEFAULT_BLOCK_BYTES,
                  include=None, exclude=None, preset=None, prefix_map=None,
                  ignore_missing=None) -> FineTunePlan:
    """Validate one fine-tune against the base and cut it into work units."""
    if block_bytes <= 0:
        raise InputError(f"--block-bytes must be positive, got {block_bytes}")
    spec.params.validate(f"fine-tune {spec.name!r}")
    matches = match_checkpoints(base, spec.checkpoint, include=include, exclude=exclude,
                                preset=preset, prefix_map=prefix_map, ignore_missing=ignore_missing)
    plan = FineTunePlan(spec)
    for m in matches:
        info = spec.checkpoint.tensors[m.name]
        base_info = base.tensors[m.base_name] if m.base_name is not None else None
        rows, row_len = info.row_geometry
        blocks = row_blocks(info, block_bytes) if m.action == "prune" else [(0, rows)]
        plan.tensors[m.name] = {
            "shape": list(info.shape), "dtype": info.dtype, "action": m.action, "reason": m.reason,
            "rows": rows, "row_len": row_len, "base_name": m.base_name,
            "blocks": [list(b) for b in blocks],
        }
        seed = tensor_seed(spec.params.seed, m.name)
        for a, b in blocks:
            plan.units.append(WorkUnit(spec.name, m.name, m.action, info, base_info, a, b, spec.params, seed))
    # Largest units first (stable: file order among equals), so the job does not end with one
    # actor finishing a big block (an lm_head, say) while the others idle: the small ones fill in.
    plan.units.sort(key=lambda u: -u.elements)
    return plan
