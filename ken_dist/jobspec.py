"""A prune job as data: one base, one or more fine-tunes with their parameters, one store.

Built from CLI flags or loaded from a YAML job file; validated when built, with errors that name
the offending field, so a typo fails before a cluster is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ken_dist.checkpoint import Checkpoint, open_checkpoint
from ken_dist.errors import KenError
from ken_dist.plan import DEFAULT_BLOCK_BYTES, FineTuneSpec, PruneParams


@dataclass(frozen=True)
class FineTuneEntry:
    name: str
    source: str
    revision: str | None = None
    params: PruneParams = field(default_factory=PruneParams)


@dataclass(frozen=True)
class JobSpec:
    base: str
    finetunes: tuple[FineTuneEntry, ...]
    store: str
    base_revision: str | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    preset: str | None = None
    prefix_map: dict | None = None
    ignore_missing: tuple[str, ...] | None = None
    block_bytes: int = DEFAULT_BLOCK_BYTES
    address: str | None = None
    workers: int | None = None

    def __post_init__(self):
        if not self.finetunes:
            raise KenError("the job has no fine-tunes: give at least one FINETUNE (or `finetunes:` in the job file)")
        seen = set()
        for ft in self.finetunes:
            if not ft.name:
                raise KenError(f"fine-tune {ft.source!r} has an empty name; set `name`")
            if ft.name in seen:
                raise KenError(f"two fine-tunes are named {ft.name!r}; give each a distinct `name` "
                               "(--name on the CLI, `name:` in a job file)")
            seen.add(ft.name)
            ft.params.validate(f"fine-tune {ft.name!r}")
        if not isinstance(self.block_bytes, int) or self.block_bytes <= 0:
            raise KenError(f"block_bytes must be a positive integer, got {self.block_bytes!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise KenError(f"workers must be a positive integer, got {self.workers!r}")

    def open_base(self) -> Checkpoint:
        return open_checkpoint(self.base, self.base_revision)

    def open_finetunes(self) -> list[FineTuneSpec]:
        return [FineTuneSpec(ft.name, open_checkpoint(ft.source, ft.revision), ft.params)
                for ft in self.finetunes]


def default_name(source: str) -> str:
    """A fine-tune's store name from its source: the directory or repo name."""
    p = Path(str(source).rstrip("/"))
    name = p.stem if p.suffix == ".safetensors" else p.name
    return name or str(source)


_JOB_FIELDS = {f.name for f in fields(JobSpec)} | {"cluster", "k", "keep", "strategy", "compat", "seed"}
_FT_FIELDS = {"name", "source", "path", "revision", "k", "keep", "strategy", "compat", "seed"}
_PARAM_FIELDS = ("strategy", "k", "keep", "compat", "seed")


def _params(where: str, data: dict, defaults: dict) -> PruneParams:
    merged = {**defaults, **{key: data[key] for key in _PARAM_FIELDS if key in data}}
    if "k" in data and "keep" not in data:
        merged.pop("keep", None)
    if "keep" in data and "k" not in data:
        merged.pop("k", None)
    params = PruneParams(**merged)
    params.validate(where)
    return params


def load_job_file(path: str | Path) -> JobSpec:
    """Load and validate a YAML job file (see jobs/example_job.yaml for the fields)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KenError(f"job file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise KenError(f"job file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KenError(f"job file {path}: expected a mapping with base, finetunes, store")
    unknown = sorted(set(data) - _JOB_FIELDS)
    if unknown:
        raise KenError(f"job file {path}: unknown field(s) {', '.join(unknown)}; "
                       f"known: {', '.join(sorted(_JOB_FIELDS))}")
    for required in ("base", "finetunes", "store"):
        if required not in data:
            raise KenError(f"job file {path}: missing field `{required}`")
    defaults = {key: data[key] for key in _PARAM_FIELDS if key in data}
    if not isinstance(data["finetunes"], list) or not data["finetunes"]:
        raise KenError(f"job file {path}: `finetunes` must be a non-empty list")
    entries = []
    for i, item in enumerate(data["finetunes"]):
        where = f"job file {path}: finetunes[{i}]"
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict):
            raise KenError(f"{where}: expected a mapping (name, source, k/keep, strategy) or a path")
        bad = sorted(set(item) - _FT_FIELDS)
        if bad:
            raise KenError(f"{where}: unknown field(s) {', '.join(bad)}; known: {', '.join(sorted(_FT_FIELDS))}")
        source = item.get("source", item.get("path"))
        if not source:
            raise KenError(f"{where}: missing `source` (a local path or HF repo id)")
        try:
            params = _params(where, item, defaults)
        except TypeError as exc:
            raise KenError(f"{where}: {exc}") from None
        entries.append(FineTuneEntry(str(item.get("name") or default_name(source)), str(source),
                                     item.get("revision"), params))
    cluster = data.get("cluster") or {}
    if not isinstance(cluster, dict) or set(cluster) - {"address", "workers"}:
        raise KenError(f"job file {path}: `cluster` takes only `address` and `workers`")

    def _list(key):
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise KenError(f"job file {path}: `{key}` must be a regex or a list of regexes")
        return tuple(value)

    return JobSpec(
        base=str(data["base"]), finetunes=tuple(entries), store=str(data["store"]),
        base_revision=data.get("base_revision"), include=_list("include"), exclude=_list("exclude"),
        preset=data.get("preset"), prefix_map=data.get("prefix_map"), ignore_missing=_list("ignore_missing"),
        block_bytes=data.get("block_bytes", DEFAULT_BLOCK_BYTES),
        address=cluster.get("address", data.get("address")), workers=cluster.get("workers", data.get("workers")),
    )
