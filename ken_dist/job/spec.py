"""A prune job as data: one base, one or more fine-tunes with their parameters, one store.

Built from CLI flags or loaded from a YAML job file; validated when built, with errors that name
the offending field, so a typo fails before a cluster is touched.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path

from ken_dist.checkpoints.inventory import Checkpoint, open_checkpoint
from ken_dist.errors import InputError
from ken_dist.job.match import PRESETS
from ken_dist.job.plan import DEFAULT_BLOCK_BYTES, FineTuneSpec, PruneParams
from ken_dist.store.codecs import parse_codec

PLACEMENTS = ("mixed", "gpu", "cpu")  # actor placement policies, see ken_dist.runtime.pool


def _encodable(path: str) -> bool:
    """True when the OS can take `path` as a file name (os.fsencode: a YAML "\\ud800" escape cannot)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class FineTuneEntry:
    name: str
    source: str
    revision: str | None = None
    params: PruneParams = field(default_factory=PruneParams)
    fit_texts: str | None = None  # after pruning: `ken-dist fit-scales` on these texts (a lossy `values` only)


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
    placement: str = "mixed"  # see ken_dist.runtime.pool: mixed, gpu or cpu

    def __post_init__(self):
        for what, path in [("base", self.base), ("store", self.store)] + [
                (f"fine-tune {ft.name!r} source", ft.source) for ft in self.finetunes]:
            if not isinstance(path, str) or not path or "\x00" in path or not _encodable(path):
                raise InputError(f"the {what} {path!r} is not a usable path (empty, holds a NUL byte, or "
                                 f"characters no file name can hold, such as a lone UTF-16 surrogate)")
        if not self.finetunes:
            raise InputError("the job has no fine-tunes: give at least one FINETUNE (or `finetunes:` in the job file)")
        seen = set()
        for ft in self.finetunes:
            if not ft.name:
                raise InputError(f"fine-tune {ft.source!r} has an empty name; set `name`")
            if ft.name in seen:
                raise InputError(f"two fine-tunes are named {ft.name!r}; give each a distinct `name` "
                               "(--name on the CLI, `name:` in a job file)")
            seen.add(ft.name)
            ft.params.validate(f"fine-tune {ft.name!r}")
        if not isinstance(self.block_bytes, int) or self.block_bytes <= 0:
            raise InputError(f"block_bytes must be a positive integer, got {self.block_bytes!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise InputError(f"workers must be a positive integer, got {self.workers!r}")
        if self.placement not in PLACEMENTS:
            raise InputError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")

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


_JOB_FIELDS = {f.name for f in fields(JobSpec)} | {"cluster", "k", "keep", "strategy", "compat", "seed", "values"}
_FT_FIELDS = {"name", "source", "path", "revision", "k", "keep", "strategy", "compat", "seed", "values", "fit_texts"}
_CLUSTER_FIELDS = {"address", "workers", "placement"}
_PARAM_FIELDS = ("strategy", "k", "keep", "compat", "seed", "values")
_PARAM_TYPES = {"strategy": (str,), "compat": (str,), "seed": (int,), "k": (int,), "keep": (int, float),
                "values": (str,)}


def _check_type(where: str, key: str, value, types: tuple, what: str) -> None:
    """InputError naming the field unless value is one of types (bool is never an int here)."""
    if isinstance(value, bool) or not isinstance(value, types):
        raise InputError(f"{where}: `{key}` must be {what}, got {value!r} ({type(value).__name__})")


def _params(where: str, data: dict, defaults: dict) -> PruneParams:
    what = {"strategy": "a strategy name", "compat": "'index' or 'reference'", "seed": "an integer",
            "k": "an integer >= 1", "keep": "a fraction in (0, 1]", "values": "a value codec (raw, int8, int4, int2, sign)"}
    for key in _PARAM_FIELDS:
        if key in data and data[key] is not None:
            _check_type(where, key, data[key], _PARAM_TYPES[key], what[key])
    merged = {**defaults, **{key: data[key] for key in _PARAM_FIELDS if key in data}}
    if "k" in data and "keep" not in data:
        merged.pop("keep", None)
    if "keep" in data and "k" not in data:
        merged.pop("k", None)
    if merged.get("k") is None and merged.get("keep") is None:
        raise InputError(f"{where}: no `k` or `keep`; set one for this fine-tune or at the top of the job file")
    params = PruneParams(**merged)
    params.validate(where)
    return params


def _regexes(where: str, key: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise InputError(f"{where}: `{key}` must be a regex or a list of regexes, got {value!r}")
    for v in items:
        try:
            re.compile(v)
        except re.error as exc:
            raise InputError(f"{where}: `{key}` holds an invalid regex {v!r}: {exc}") from None
    return tuple(items)


def _optional_str(where: str, data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is not None:
        _check_type(where, key, value, (str,), "a string")
    return value


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(i?)[bB]?|[bB])?\s*")
_SCALE = {"K": 1, "M": 2, "G": 3, "T": 4}


def parse_bytes(text) -> int:
    """A byte size: '67108864', '64MiB' (binary), '1.5GB' (decimal), '512 B' -> bytes.

    The one parser of sizes (CLI flags, job files, benchmarks). A fraction is allowed only with a
    unit and must come to a whole number of bytes, so '1.5' is refused instead of becoming 1."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise InputError(f"not a byte size: {text!r}; write a whole number of bytes (67108864) or a number "
                         f"with a unit (64MiB, 1.5GB)")
    number, unit, binary = m.group(1), (m.group(2) or "").upper(), m.group(3)
    if "." in number and not unit and not str(text).rstrip().endswith(("b", "B")):
        raise InputError(f"byte size {text!r} has a fraction but no unit; write whole bytes or add a unit "
                         f"(e.g. 1.5MiB)")
    scale = (1024 if binary else 1000) ** _SCALE[unit] if unit else 1
    exact = Fraction(number) * scale  # exact: 0.3GiB is not a whole number of bytes
    if exact.denominator != 1:
        raise InputError(f"byte size {text!r} is not a whole number of bytes ({float(exact):.10g}); use a "
                         f"smaller unit")
    value = int(exact)
    if value <= 0:
        raise InputError(f"byte size must be positive: {text!r}")
    return value


def _block_bytes(where: str, value) -> int:
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except InputError as exc:
            raise InputError(f"{where}: `block_bytes`: {exc}") from None
    _check_type(where, "block_bytes", value, (int,), "a positive integer or a size like '64MiB'")
    if value <= 0:
        raise InputError(f"{where}: `block_bytes` must be positive, got {value}")
    return value


def _finetune(path: Path, i: int, item, defaults: dict) -> FineTuneEntry:
    where = f"job file {path}: finetunes[{i}]"
    if isinstance(item, str):
        item = {"source": item}
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a mapping (name, source, k/keep, strategy) or a path, got {item!r}")
    bad = sorted(set(item) - _FT_FIELDS)
    if bad:
        raise InputError(f"{where}: unknown field(s) {', '.join(bad)}; known: {', '.join(sorted(_FT_FIELDS))}")
    if "source" in item and "path" in item:
        raise InputError(f"{where}: give `source` or `path` (the same thing), not both")
    source = item.get("source", item.get("path"))
    if not source:
        raise InputError(f"{where}: missing `source` (a local path or HF repo id)")
    _check_type(where, "source", source, (str,), "a path or HF repo id")
    name = item.get("name")
    if name is not None:
        _check_type(where, "name", name, (str,), "a non-empty string")
    where = f"{where} ({name or default_name(source)})"
    try:
        params = _params(where, item, defaults)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None
    fit_texts = _optional_str(where, item, "fit_texts")
    if fit_texts is not None:
        if not parse_codec(params.values).lossy:
            raise InputError(f"{where}: `fit_texts` fits the scales of a lossy value codec, and `values` is "
                             f"{params.values!r}; set `values` (e.g. sign-g64) or drop `fit_texts`")
    return FineTuneEntry(str(name or default_name(source)), str(source), _optional_str(where, item, "revision"),
                         params, fit_texts)


def load_job_file(path: str | Path) -> JobSpec:
    """Load and validate a YAML job file (jobs/example_job.yaml documents every field).

    Every error is a InputError naming the file and the field. Relative paths in the file are
    relative to the directory ken-dist runs in (inside a Ray Job: its working directory), so
    jobs on a cluster should use absolute paths on shared storage."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"job file {path} does not exist (or is a directory)") from None
    except yaml.YAMLError as exc:
        raise InputError(f"job file {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"job file {path} is not UTF-8 text; is it really the YAML job file?") from None
    if not isinstance(data, dict):
        raise InputError(f"job file {path}: expected a mapping with base, finetunes, store")
    where = f"job file {path}"
    unknown = sorted(set(data) - _JOB_FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                       f"known: {', '.join(sorted(_JOB_FIELDS))}")
    for required in ("base", "finetunes", "store"):
        if required not in data or data[required] in (None, ""):
            raise InputError(f"{where}: missing field `{required}`")
    for key in ("base", "store"):
        _check_type(where, key, data[key], (str,), "a path" + (" or HF repo id" if key == "base" else ""))
    defaults = {key: data[key] for key in _PARAM_FIELDS if key in data}
    for key, value in defaults.items():
        if value is not None:
            _check_type(where, key, value, _PARAM_TYPES[key], "an integer" if key in ("k", "seed") else
                        "a fraction in (0, 1]" if key == "keep" else "a string")
    if not isinstance(data["finetunes"], list) or not data["finetunes"]:
        raise InputError(f"{where}: `finetunes` must be a non-empty list")
    entries = [_finetune(path, i, item, defaults) for i, item in enumerate(data["finetunes"])]
    cluster = data.get("cluster") or {}
    if not isinstance(cluster, dict) or set(cluster) - _CLUSTER_FIELDS:
        raise InputError(f"{where}: `cluster` takes only {', '.join(sorted(_CLUSTER_FIELDS))}, got {cluster!r}")
    for key in ("address", "workers", "placement"):
        if key in cluster and key in data:
            raise InputError(f"{where}: `{key}` is given both at the top and under `cluster`; keep one")
    settings = {key: cluster.get(key, data.get(key)) for key in ("address", "workers", "placement")}
    if settings["address"] is not None:
        _check_type(where, "cluster.address", settings["address"], (str,), "a Ray address ('auto', 'ray://...')")
    if settings["workers"] is not None:
        _check_type(where, "cluster.workers", settings["workers"], (int,), "a positive integer")
    if settings["placement"] is not None and settings["placement"] not in PLACEMENTS:
        raise InputError(f"{where}: `cluster.placement` must be one of {', '.join(PLACEMENTS)}, "
                       f"got {settings['placement']!r}")
    preset = _optional_str(where, data, "preset")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"{where}: `preset` must be one of {', '.join(PRESETS)}, got {preset!r}")
    prefix_map = data.get("prefix_map")
    if prefix_map is not None and (not isinstance(prefix_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prefix_map.items())):
        raise InputError(f"{where}: `prefix_map` must map fine-tune prefixes to base prefixes "
                       f"(e.g. {{'bert.': ''}}), got {prefix_map!r}")
    options = dict(
        base_revision=_optional_str(where, data, "base_revision"),
        include=_regexes(where, "include", data.get("include")),
        exclude=_regexes(where, "exclude", data.get("exclude")), preset=preset, prefix_map=prefix_map,
        ignore_missing=_regexes(where, "ignore_missing", data.get("ignore_missing")),
        block_bytes=_block_bytes(where, data.get("block_bytes", DEFAULT_BLOCK_BYTES)),
        address=settings["address"], workers=settings["workers"], placement=settings["placement"] or "mixed")
    try:
        return JobSpec(base=data["base"], finetunes=tuple(entries), store=data["store"], **options)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
