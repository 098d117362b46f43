"""The subnetwork store: a partitioned Parquet dataset plus a manifest per fine-tune.

Why it is shaped this way (docs/format.md is the normative description):
- Workers write part files directly (tmp file + fsync + rename), so a block is either absent
  or complete on disk, and no tensor bytes travel through the driver.
- Only the driver commits: it appends the workers' block records to an fsync'ed JSONL journal.
  A driver killed with SIGKILL loses nothing it committed; `completed_blocks` is the resume set.
- `finalize` folds the journal into the manifest and sets `complete` only when every planned
  block is there, so a reader never mistakes a half-written fine-tune for a finished one.
- Every fine-tune and tensor name is escaped before it becomes a path, and the resolved path is
  checked to lie inside the store: a hostile name cannot write anywhere else.
- An exclusive flock per fine-tune keeps two prune runs from interleaving their journals.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ken_dist.checkpoints.dtypes import (
    as_numpy,
    is_torch_tensor,
    itemsize,
    storage_bits,
)
from ken_dist.checkpoints.geometry import row_geometry
from ken_dist.errors import KenError, StoreError
from ken_dist.store.codecs import Codec, parse_codec
from ken_dist.store.fs import (
    append_jsonl,
    atomic_json,
    atomic_output,
    atomic_write,
    escape_name,
    fsync_path,
    now,
    read_jsonl,
    sha256_file,
    unescape_name,
)
from ken_dist.store.manifest_check import bad_record_field, check_manifest
from ken_dist.store.parts import block_columns, encode_block, part_bytes, write_whole_parquet

log = logging.getLogger(__name__)

FORMAT = "ken-subnetwork"
FORMAT_VERSION = 2  # the newest manifest version this code reads and writes
MARKER_VERSION = 1  # ken_store.json: the layout, unchanged by version 2
MARKER = "ken_store.json"
_RECORD_KEYS = ("tensor", "row_start", "row_end", "file", "kept", "bytes", "sha256")
_V2_BLOCK_KEYS = ("values", "index")  # a block carrying one needs a version 2 reader
_PLAN_KEYS = ("shape", "dtype", "action", "rows", "row_len", "base_name")


def check_format(obj: dict, where: str, newest: int | None = None) -> None:
    """Refuse stores and manifests that this ken_dist cannot read (format_version above `newest`,
    by default FORMAT_VERSION, the manifests' version; the store marker passes MARKER_VERSION)."""
    newest = FORMAT_VERSION if newest is None else newest
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        raise StoreError(f"{where} is not a ken_dist subnetwork store file (format {found!r}, "
                         f"expected {FORMAT!r}); point to the store directory written by `ken-dist prune`")
    v = obj.get("format_version")
    if not isinstance(v, int) or v < 1:
        raise StoreError(f"{where} has an invalid format_version {v!r}; the file is damaged")
    if v > newest:
        from ken_dist import __version__
        raise StoreError(f"{where} has format_version {v}, newer than this ken_dist {__version__} reads "
                         f"(up to {newest}); upgrade ken_dist (pip install -U ken-dist)")


def manifest_version(params: dict, blocks=()) -> int:
    """1 unless version 2 is needed: a lossy value codec in params, or a block recording a lossy
    codec or an index list. Raw bitmask fine-tunes stay version 1, readable by every release."""
    lossy = parse_codec(params.get("values", "raw")).lossy if isinstance(params, dict) else False
    return 2 if lossy or any(k in b for b in blocks for k in _V2_BLOCK_KEYS) else 1


def _read_json(path: str, what: str):
    """A store file's JSON document, or a StoreError naming the file (never a JSONDecodeError)."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise StoreError(f"{path}: cannot read the {what} ({e}); the file is damaged: restore it, or prune "
                         f"again with --overwrite") from None


WHOLE_LEAF = "whole.parquet"
SPILL_DIR = "spill"  # a writer's temporary files between the passes of a model-budget job; readers ignore it


def _block_leaf(row_start: int, row_end: int) -> str:
    """The file name of the part holding rows [row_start, row_end) (docs/format.md, Layout)."""
    return f"part-{int(row_start):010d}-{int(row_end):010d}.parquet"


def _well_formed(rec) -> bool:
    """A journal record with every field of its kind (anything else is not a commit, as a torn line)."""
    if not isinstance(rec, dict) or not all(k in rec for k in _RECORD_KEYS) or bad_record_field(rec) is not None:
        return False
    rows = [rec["row_start"], rec["row_end"]]
    return (isinstance(rec["tensor"], str) and rec["tensor"] != ""
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rows) and rows[0] < rows[1])


def _dir_name(escaped: str) -> str:
    """The fine-tune name a directory stands for (itself when it is not an escaped name)."""
    try:
        return unescape_name(escaped)
    except (KenError, ValueError):
        return escaped


def _fingerprint(identity: dict) -> dict:
    """What must not change between runs: the files (base names, sizes, header hashes). Where
    they live (root, source) and how they were reached (revision) may change."""
    identity = identity or {}
    files = identity.get("files")
    if not isinstance(files, list):
        return {k: v for k, v in identity.items() if k not in ("source", "root", "revision")}
    return {"files": sorted((dict(f, name=os.path.basename(str(f.get("name", "")))) if isinstance(f, dict)
                             else os.path.basename(str(f)) for f in files), key=json.dumps)}


def _diff(label: str, old, new, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            _diff(f"{label}.{k}", old.get(k, "<absent>"), new.get(k, "<absent>"), out)
    elif old != new:
        out.append(f"{label}: stored {json.dumps(old)[:120]}, given {json.dumps(new)[:120]}")


def _normalize_plan(tensors: dict) -> dict:
    plan = {}
    for name, t in tensors.items():
        missing = [k for k in _PLAN_KEYS if k not in t]
        if missing:
            raise KenError(f"plan for tensor {name!r} lacks {missing}; each entry needs {list(_PLAN_KEYS)}")
        itemsize(t["dtype"])  # a known dtype
        if t["action"] not in ("prune", "whole"):
            raise KenError(f"tensor {name!r}: action must be 'prune' or 'whole', got {t['action']!r}")
        rows, row_len = int(t["rows"]), int(t["row_len"])
        numel = 1
        for s in t["shape"]:
            numel *= int(s)
        if rows * row_len != numel:
            raise KenError(f"tensor {name!r}: rows {rows} x row_len {row_len} != numel of shape {t['shape']}")
        blocks = [[0, rows]] if t["action"] == "whole" else [[int(a), int(b)] for a, b in t.get("blocks", [])]
        edge = 0
        for a, b in (sorted(blocks) if t["action"] == "prune" else []):
            if a != edge or b <= a:
                raise KenError(f"tensor {name!r}: planned blocks {blocks} must tile rows [0, {rows}) "
                               f"without gaps or overlaps")
            edge = b
        if t["action"] == "prune" and edge != rows:
            raise KenError(f"tensor {name!r}: planned blocks end at row {edge}, tensor has {rows} rows")
        entry = {k: v for k, v in t.items() if k != "blocks"}
        entry.update(shape=[int(s) for s in t["shape"]], rows=rows, row_len=row_len, kept=None, bytes=None,
                     blocks=[{"row_start": a, "row_end": b} for a, b in sorted(blocks)])
        plan[name] = entry
    return plan


def _bits(tensor: str, values, dtype: str | None) -> tuple[np.ndarray, str]:
    """(storage bits, dtype name) of what a writer was given: a torch tensor or numpy bits + name."""
    if is_torch_tensor(values):
        return storage_bits(values)
    if dtype is None:
        raise KenError(f"tensor {tensor!r}: numpy values need dtype= (their safetensors name, e.g. 'BF16': "
                       "bf16 bits travel as uint16)")
    values = np.asarray(values)
    if values.itemsize != itemsize(dtype):
        raise KenError(f"tensor {tensor!r}: {values.dtype} values cannot hold dtype {dtype} "
                       f"({itemsize(dtype)} bytes per element)")
    return values, dtype


class Store:
    """A directory holding subnetworks; see the module docstring and docs/format.md."""

    def __init__(self, path, *, create: bool = False):
        self.root = os.path.realpath(os.fspath(path))
        self._locks: dict[str, int] = {}
        self._scoped: set[str] = set()  # held by `locked`: finalize leaves them to its exit
        marker = os.path.join(self.root, MARKER)
        if not os.path.exists(marker):
            if not create:
                raise StoreError(f"{self.root} is not a ken_dist store (no {MARKER}); check the path, "
                               f"or create one with `ken-dist prune --store {path}`")
            if os.path.isdir(self.root) and os.listdir(self.root):
                raise KenError(f"refusing to create a store in {self.root}: the directory is not empty "
                               f"and has no {MARKER}; choose an empty or new directory")
            os.makedirs(os.path.join(self.root, "finetunes"), exist_ok=True)
            atomic_json(marker, {"format": FORMAT, "format_version": MARKER_VERSION})
        check_format(_read_json(marker, "store marker"), marker, MARKER_VERSION)

    # ---- paths -------------------------------------------------------------------------------
    def resolve(self, rel: str) -> str:
        """Absolute path of a store-relative file, refused if it resolves outside the store."""
        try:
            path = os.path.realpath(os.path.join(self.root, *str(rel).split("/")))
        except ValueError:  # a NUL byte
            path = ""
        if not path.startswith(self.root + os.sep):
            raise StoreError(f"path {rel!r} resolves outside the store {self.root}; the manifest or "
                           f"journal is damaged or hostile")
        return path

    def _ft_rel(self, finetune: str) -> str:
        return f"finetunes/{escape_name(finetune)}"

    def _ft_dir(self, finetune: str) -> str:
        return self.resolve(self._ft_rel(finetune))

    def _part_rel(self, finetune: str, tensor: str, leaf: str) -> str:
        return f"{self._ft_rel(finetune)}/tensors/{escape_name(tensor)}/{leaf}"

    def spill_path(self, finetune: str, tensor: str, row_start: int, row_end: int) -> str:
        """Where the scoring pass of a model-budget job keeps a block's candidates
        (ken_dist/store/spill.py): under the fine-tune's `spill/`, which finalize deletes."""
        leaf = _block_leaf(row_start, row_end).replace(".parquet", ".spill")
        return self.resolve(f"{self._ft_rel(finetune)}/{SPILL_DIR}/{escape_name(tensor)}/{leaf}")

    def drop_spills(self, finetune: str) -> None:
        """Delete the fine-tune's spill files (and tmp files of killed writers among them)."""
        path = self.resolve(f"{self._ft_rel(finetune)}/{SPILL_DIR}")
        if os.path.isdir(path):
            shutil.rmtree(path)

    # ---- lock --------------------------------------------------------------------------------
    def acquire(self, finetune: str) -> None:
        """Take the fine-tune's exclusive lock (no-op if this Store already holds it)."""
        if finetune in self._locks:
            return
        ftdir = self._ft_dir(finetune)
        os.makedirs(ftdir, exist_ok=True)
        fd = os.open(os.path.join(ftdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "{}"
            os.close(fd)
            try:
                h = json.loads(holder)
            except ValueError:
                h = {}
            raise KenError(f"store {self.root} fine-tune {finetune!r} is being written by another run "
                           f"(pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}); "
                           f"wait for it to finish or stop it, then rerun (it resumes)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now()}).encode(), 0)
        self._locks[finetune] = fd

    @contextlib.contextmanager
    def locked(self, finetunes):
        """Hold the locks of several fine-tunes for a whole job (the driver's way)."""
        names = [finetunes] if isinstance(finetunes, str) else list(finetunes)
        taken = []
        try:
            for ft in names:
                if ft not in self._locks:
                    self.acquire(ft)
                    taken.append(ft)
                    self._scoped.add(ft)
            yield self
        finally:
            for ft in taken:
                self._scoped.discard(ft)
                self.release(ft)

    def release(self, finetune: str) -> None:
        fd = self._locks.pop(finetune, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        for ft in list(self._locks):
            self.release(ft)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if not getattr(self, "_locks", None):
            return  # nothing held (or __init__ failed before it could hold anything)
        try:
            self.close()
        except OSError as exc:
            log.warning("store %s: releasing its locks when it was garbage-collected failed (%s); they are "
                        "released when this process exits", self.root, exc)

    # ---- manifest ----------------------------------------------------------------------------
    def _manifest_path(self, finetune: str) -> str:
        return os.path.join(self._ft_dir(finetune), "manifest.json")

    def manifest(self, finetune: str) -> dict:
        path = self._manifest_path(finetune)
        if not os.path.exists(path):
            raise StoreError(f"store {self.root} has no fine-tune {finetune!r}; it holds: "
                           f"{', '.join(map(repr, self.finetunes())) or 'nothing yet'}")
        m = _read_json(path, f"manifest of fine-tune {finetune!r}")
        check_format(m, path)
        check_manifest(m, path, finetune)
        return m

    def manifest_size(self, finetune: str) -> int:
        """Bytes of the fine-tune's manifest.json (part of what a stored fine-tune costs)."""
        return os.path.getsize(self._manifest_path(finetune))

    def finetunes(self) -> list[str]:
        base = os.path.join(self.root, "finetunes")
        names = []
        for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            path = os.path.join(base, d, "manifest.json")
            if os.path.exists(path):  # the manifest's name (a long name is cut in the directory's)
                try:
                    with open(path, "rb") as f:
                        name = json.load(f)["finetune"]
                except (OSError, ValueError, TypeError, KeyError):
                    name = None  # a broken manifest still lists its fine-tune; manifest() says what broke
                names.append(name if isinstance(name, str) and name and escape_name(name) == d else _dir_name(d))
        return sorted(names)

    def begin(self, finetune: str, *, params: dict, base_identity: dict, finetune_identity: dict,
              tensors: dict[str, dict], overwrite: bool = False) -> str:
        """Record the job's parameters and block plan; take the fine-tune's lock.

        Same params, identities and tensors as a stored run: resume (the block plan may change;
        committed blocks of the old plan are then recomputed). Anything else differs: KenError
        naming it, unless overwrite=True, which deletes this fine-tune's data first.
        Returns "new", "resume", or "complete": already complete with this plan and every part
        present, so there is nothing to do (the manifest is then left untouched unless the
        checkpoints were reached by another path)."""
        self.acquire(finetune)
        plan = _normalize_plan(tensors)
        old = self.manifest(finetune) if os.path.exists(self._manifest_path(finetune)) else None
        if old is not None and overwrite:
            self._clear(finetune)
            old = None
        stamp = now()
        if old is not None:
            diffs: list[str] = []
            _diff("params", old["params"], params, diffs)
            _diff("base", _fingerprint(old["base_identity"]), _fingerprint(base_identity), diffs)
            _diff("finetune", _fingerprint(old["finetune_identity"]), _fingerprint(finetune_identity), diffs)
            _diff("tensors", {n: {k: t.get(k) for k in _PLAN_KEYS} for n, t in old["tensors"].items()},
                  {n: {k: t.get(k) for k in _PLAN_KEYS} for n, t in plan.items()}, diffs)
            if diffs:
                shown = "\n  - ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
                raise KenError(f"store {self.root} already holds fine-tune {finetune!r} written with different "
                               f"settings:\n  - {shown}\nrerun with --overwrite (overwrite=True) to discard it, "
                               f"or use another store or fine-tune name")
            same_plan = all([(b["row_start"], b["row_end"]) for b in old["tensors"][n]["blocks"]] ==
                            [(b["row_start"], b["row_end"]) for b in plan[n]["blocks"]] for n in plan)
            if same_plan and old.get("complete") and self._parts_present(old):
                if (old["base_identity"], old["finetune_identity"]) != (base_identity, finetune_identity):
                    atomic_json(self._manifest_path(finetune), dict(
                        old, base_identity=base_identity, finetune_identity=finetune_identity, updated=stamp))
                return "complete"
            manifest = dict(old, base_identity=base_identity, finetune_identity=finetune_identity, updated=stamp)
            if old.get("complete"):
                self._journal_from_manifest(finetune, old)
                if manifest.pop("scale_fits", None):  # its fitted parts are not this plan's; they are pruned again
                    log.warning("fine-tune %r: its fitted scales are discarded, because its lossy blocks are "
                                "pruned again; run `ken-dist fit-scales` again when the prune run is done", finetune)
            if not same_plan or old.get("complete"):  # a part of a complete fine-tune went missing
                manifest.update(tensors=plan if not same_plan else old["tensors"], complete=False)
            if not same_plan:
                manifest.pop("budget", None)  # model budgets belong to a block plan
        else:
            from ken_dist import __version__
            manifest = {"format": FORMAT, "format_version": manifest_version(params), "finetune": finetune,
                        "created": stamp, "updated": stamp, "ken_dist_version": __version__,
                        "params": params, "base_identity": base_identity,
                        "finetune_identity": finetune_identity, "tensors": plan,
                        "complete": False, "summary": None, "totals": None}
        atomic_json(self._manifest_path(finetune), manifest)
        return "new" if old is None else "resume"

    def set_budgets(self, finetune: str, budgets: dict, summary: dict) -> None:
        """Record each planned block's keep budget (strategies of scope "model", ken_dist/kernel/strategies/budget.py)
        before any block runs, so that a resumed run selects with the same budgets."""
        self.acquire(finetune)
        manifest = self.manifest(finetune)
        for name, t in manifest["tensors"].items():
            for b in t["blocks"]:
                key = (name, b["row_start"], b["row_end"])
                if key in budgets:
                    b["budget"] = int(budgets[key])
        manifest.update(budget=summary, updated=now())
        atomic_json(self._manifest_path(finetune), manifest)

    def budgets(self, finetune: str) -> dict | None:
        """{(tensor, row_start, row_end): budget} recorded by set_budgets for the current block
        plan, or None when there is none (never scored, or the plan changed since)."""
        manifest = self.manifest(finetune)
        if "budget" not in manifest:
            return None
        out = {}
        for name, t in manifest["tensors"].items():
            for b in t["blocks"] if t["action"] == "prune" else ():
                if "budget" not in b:
                    return None
                out[(name, b["row_start"], b["row_end"])] = int(b["budget"])
        return out

    def _parts_present(self, manifest: dict) -> bool:
        """Every block file of a complete manifest exists with its recorded size (stat only)."""
        for t in manifest["tensors"].values():
            for b in t["blocks"]:
                try:
                    path = self.resolve(b["file"])
                except (KenError, KeyError):
                    return False
                if not os.path.isfile(path) or os.path.getsize(path) != b.get("bytes"):
                    return False
        return True

    def _clear(self, finetune: str) -> None:
        ftdir = self._ft_dir(finetune)
        for entry in os.listdir(ftdir):
            if entry == ".lock":
                continue
            path = os.path.join(ftdir, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        fsync_path(ftdir)

    # ---- worker side -------------------------------------------------------------------------
    def _begun(self, finetune: str) -> None:
        if not os.path.exists(self._manifest_path(finetune)):
            raise KenError(f"store {self.root}: fine-tune {finetune!r} was not begun; call Store.begin first")

    def write_block(self, finetune: str, tensor: str, row_start: int, row_end: int,
                    mask, values, dtype: str | None = None, *, codec: Codec | str = "raw", base=None) -> dict:
        """Write rows [row_start, row_end) of a pruned tensor as one part; returns its record.

        mask: bool, shaped like values. values: a torch tensor, or a numpy array of storage bits
        (ken_dist.checkpoints.dtypes) with `dtype` its safetensors name. codec: the value codec
        (ken_dist.store.codecs); a lossy one needs `base`, the same rows of the base (a tensor or
        storage bits). Safe in worker processes: touches only its own part file. Deterministic:
        the same block written twice gives the same bytes (and sha256)."""
        self._begun(finetune)
        r = int(row_end) - int(row_start)
        if r <= 0 or row_start < 0:
            raise KenError(f"tensor {tensor!r}: bad row range [{row_start}, {row_end})")
        values, dtype = _bits(tensor, values, dtype)
        if values.size % r:
            raise KenError(f"tensor {tensor!r} rows [{row_start}, {row_end}): {values.size} values "
                           f"do not split into {r} rows")
        values = values.reshape(r, -1)
        mask = as_numpy(mask)
        if mask.dtype != np.bool_ or mask.size != values.size:
            raise KenError(f"tensor {tensor!r} rows [{row_start}, {row_end}): mask must be a bool tensor "
                           f"shaped like values {list(values.shape)}, got {mask.dtype} {list(mask.shape)}")
        codec = parse_codec(codec) if isinstance(codec, str) else codec
        if codec.applies_to(dtype):
            if base is None:
                raise KenError(f"tensor {tensor!r}: values {codec.spec!r} store the delta to the base; pass base=")
            base, _ = _bits(tensor, base, dtype)
            if base.size != values.size:
                raise KenError(f"tensor {tensor!r} rows [{row_start}, {row_end}): base has {base.size} values, "
                               f"the fine-tune {values.size}")
        try:
            table, stats = encode_block(int(row_start), mask.reshape(values.shape), values, codec=codec,
                                        base=None if base is None else base.reshape(values.shape), dtype=dtype)
        except ValueError as exc:
            raise StoreError(f"tensor {tensor!r} rows [{row_start}, {row_end}): {exc}") from None
        data = part_bytes(table)
        rel = self._part_rel(finetune, tensor, _block_leaf(row_start, row_end))
        path = self.resolve(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, data)
        return {"tensor": tensor, "row_start": int(row_start), "row_end": int(row_end), "file": rel,
                "kept": stats["kept"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "dtype": dtype, "row_len": int(values.shape[1]), "kept_row_min": stats["kept_row_min"],
                "kept_row_max": stats["kept_row_max"], "bound_bytes": stats["bound_bytes"],
                **{k: stats[k] for k in _V2_BLOCK_KEYS if k in stats}}

    def write_whole(self, finetune: str, tensor: str, values, dtype: str | None = None) -> dict:
        """Store a tensor as it is (raw bytes, chunked); returns its record, block [0, rows).
        values: a torch tensor or a numpy storage-bits array with `dtype` (as in write_block)."""
        self._begun(finetune)
        values, dtype = _bits(tensor, values, dtype)
        rows, _ = row_geometry(values.shape)
        rel = self._part_rel(finetune, tensor, WHOLE_LEAF)
        path = self.resolve(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_output(path) as tmp:
            write_whole_parquet(tmp, values)
            digest, size = sha256_file(tmp), os.path.getsize(tmp)
        nbytes = values.nbytes
        return {"tensor": tensor, "row_start": 0, "row_end": rows, "file": rel, "kept": int(values.size),
                "bytes": size, "sha256": digest, "dtype": dtype, "shape": list(values.shape),
                "bound_bytes": float(nbytes)}

    # ---- driver side -------------------------------------------------------------------------
    def _journal(self, finetune: str) -> str:
        return os.path.join(self._ft_dir(finetune), "journal.jsonl")

    def commit(self, finetune: str, records: list[dict]) -> None:
        """Append block records to the journal and fsync: after this returns they survive kill -9."""
        self.acquire(finetune)
        for rec in records:
            missing = [k for k in _RECORD_KEYS if k not in rec]
            if missing:
                raise KenError(f"block record for {rec.get('tensor')!r} lacks {missing}; pass the dict "
                               f"returned by Store.write_block / write_whole")
            self.resolve(rec["file"])
        append_jsonl(self._journal(finetune), *records)

    def _journal_from_manifest(self, finetune: str, manifest: dict) -> None:
        """Before a complete fine-tune runs again (a part went missing, or a new block plan): its
        manifest's block records become the journal that finalize dropped, so that intact parts
        are reused as they would have been from the journal itself."""
        if os.path.exists(self._journal(finetune)):
            return  # written by a release that kept it, or a run of this one stopped mid-way
        append_jsonl(self._journal(finetune), *({"tensor": name, **b} for name, t in manifest["tensors"].items()
                                                for b in t["blocks"] if "file" in b))

    def journal(self, finetune: str) -> list[dict]:
        """Committed records in commit order; a torn or garbled line is not a commit and is skipped."""
        return [rec for rec in read_jsonl(self._journal(finetune)) if _well_formed(rec)]

    def completed_blocks(self, finetune: str, *, verify: bool = False) -> dict:
        """{(tensor, row_start, row_end): record} for committed blocks whose part file exists with
        the recorded size (and sha256 when verify=True). The latest record of a block wins."""
        done = {}
        for rec in self.journal(finetune):
            key = (rec["tensor"], rec["row_start"], rec["row_end"])
            try:
                path = self.resolve(rec["file"])
            except KenError:
                continue
            # the block's own file: a record naming another part of the same size is not this block
            ok = rec["file"] in (self._part_rel(finetune, rec["tensor"], WHOLE_LEAF),
                                 self._part_rel(finetune, rec["tensor"], _block_leaf(rec["row_start"], rec["row_end"])))
            ok = ok and os.path.isfile(path) and os.path.getsize(path) == rec["bytes"]
            if ok and verify:
                ok = sha256_file(path) == rec["sha256"]
            if ok:
                done[key] = rec
            else:
                done.pop(key, None)
        return done

    def finalize(self, finetune: str, *, summary: dict, verify: bool = False) -> dict:
        """Mark the fine-tune complete if every planned block is committed; release the lock."""
        self.acquire(finetune)
        manifest = self.manifest(finetune)
        done = self.completed_blocks(finetune, verify=verify)
        missing = [f"{name} rows [{b['row_start']}, {b['row_end']})"
                   for name, t in manifest["tensors"].items() for b in t["blocks"]
                   if (name, b["row_start"], b["row_end"]) not in done]
        if missing:
            shown = "\n  - ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise KenError(f"store {self.root} fine-tune {finetune!r} is not complete; {len(missing)} "
                           f"block(s) missing:\n  - {shown}\nrerun the same command to resume")
        totals = {"kept": 0, "bytes": 0, "bound_bytes": 0.0, "dense_bytes": 0}
        for name, t in manifest["tensors"].items():
            blocks = []
            for b in t["blocks"]:
                rec = done[(name, b["row_start"], b["row_end"])]
                blocks.append({k: rec[k] for k in ("row_start", "row_end", "file", "kept", "bytes", "sha256",
                                                   "kept_row_min", "kept_row_max", "bound_bytes", "budget",
                                                   *_V2_BLOCK_KEYS)
                               if k in rec})
            t["blocks"] = blocks
            t["kept"] = sum(b["kept"] for b in blocks)
            t["bytes"] = sum(b["bytes"] for b in blocks)
            t["bound_bytes"] = sum(b.get("bound_bytes", 0.0) for b in blocks)
            dense = t["rows"] * t["row_len"] * itemsize(t["dtype"])
            for k, v in (("kept", t["kept"]), ("bytes", t["bytes"]), ("bound_bytes", t["bound_bytes"]),
                         ("dense_bytes", dense)):
                totals[k] += v
        version = max(manifest_version(manifest["params"], (b for t in manifest["tensors"].values()
                                                            for b in t["blocks"])), manifest["format_version"])
        manifest.update(format_version=version, complete=True, summary=summary, totals=totals, updated=now())
        self.drop_spills(finetune)  # before `complete`: a complete fine-tune never runs again to drop them
        atomic_json(self._manifest_path(finetune), manifest)
        self._drop_journal(finetune)
        self._collect_garbage(finetune, self._manifest_files(manifest))
        if finetune not in self._scoped:
            self.release(finetune)
        return manifest

    def _drop_journal(self, finetune: str) -> None:
        """A complete manifest holds every block record, so the journal (only a resume reads it)
        would be dead weight in what a stored fine-tune costs and ships; a crash before the
        unlink leaves a journal that says what the manifest says."""
        path = self._journal(finetune)
        if os.path.exists(path):
            os.unlink(path)
            fsync_path(os.path.dirname(path))

    def _collect_garbage(self, finetune: str, keep: set[str]) -> None:
        """Remove parts of an earlier block plan and tmp files left by killed workers."""
        tdir = os.path.join(self._ft_dir(finetune), "tensors")
        for dirpath, dirnames, filenames in os.walk(tdir, topdown=False):
            for fn in filenames:
                path = os.path.join(dirpath, fn)
                if path not in keep and (fn.endswith(".tmp") or fn.endswith(".parquet")):
                    os.unlink(path)
            if dirpath != tdir and not os.listdir(dirpath):
                os.rmdir(dirpath)

    # ---- rewriting the scales of a complete fine-tune ------------------------------------------
    @contextlib.contextmanager
    def rescaling(self, finetune: str):
        """Replace lossy parts of a complete fine-tune with rescaled ones (subnetwork/fit_scales.py):
        `with store.rescaling(ft) as rw: rw.write(tensor, block, table) ...; rw.commit(fit)`.

        The new parts get new file names (`part-<S>-<E>-fit<N>.parquet`, N the fit's number), so the
        current manifest's parts are never touched until `commit` swaps the manifest atomically;
        a run killed or failing before that leaves the fine-tune as it was, and its new files are
        garbage that this and the next rewrite or prune remove."""
        self.acquire(finetune)
        try:
            manifest = self.manifest(finetune)
            if not manifest.get("complete"):
                raise KenError(f"store {self.root}: fine-tune {finetune!r} is incomplete; finish its prune run "
                               f"(rerun the same prune command) before fitting its scales")
            self._collect_garbage(finetune, self._manifest_files(manifest))  # a killed rewrite's files
            rw = _Rescale(self, finetune, manifest)
            try:
                yield rw
            finally:
                if not rw.committed:
                    self._collect_garbage(finetune, self._manifest_files(manifest))
        finally:
            if finetune not in self._scoped:
                self.release(finetune)

    def _manifest_files(self, manifest: dict) -> set[str]:
        return {self.resolve(b["file"]) for t in manifest["tensors"].values() for b in t["blocks"] if "file" in b}

    # ---- reading -----------------------------------------------------------------------------
    def read_part(self, block: dict, tensor: str, *, verify: bool = True, threads: bool = True,
                  path: str | None = None) -> pa.Table:
        """The Parquet table of a committed block, after checking size and sha256. threads: decode
        its columns in Arrow's threads (False for a caller that reads parts in its own threads);
        path: the part's path when the caller resolved it already."""
        rel = block["file"]
        path = path or self.resolve(rel)
        fix = "rerun the same `ken-dist prune` command (it rewrites missing blocks) or prune with --overwrite"
        if not os.path.isfile(path):
            raise StoreError(f"part file {path} of tensor {tensor!r} is missing; {fix}")
        with open(path, "rb") as f:
            data = f.read()
        if verify and (len(data) != block["bytes"] or hashlib.sha256(data).hexdigest() != block["sha256"]):
            raise StoreError(f"part file {path} of tensor {tensor!r} is corrupt (size or sha256 differs from "
                           f"the manifest); delete it and {fix}")
        try:
            return pq.ParquetFile(pa.py_buffer(data)).read(use_threads=threads)  # not read_table: no dataset setup
        except (pa.ArrowException, OSError) as e:
            raise StoreError(f"part file {path} of tensor {tensor!r} is not readable Parquet ({e}); "
                           f"delete it and {fix}") from None


class _Rescale:
    """One rewrite of a complete fine-tune's lossy parts (Store.rescaling)."""

    def __init__(self, store: Store, finetune: str, manifest: dict):
        self.store, self.finetune, self.committed = store, finetune, False
        self.manifest = json.loads(json.dumps(manifest))  # a copy: the stored one stays as it is until commit
        self.generation = len(manifest.get("scale_fits", [])) + 1

    def block(self, tensor: str, row_start: int, row_end: int) -> dict:
        """The manifest's record of a lossy block, as this rewrite will commit it."""
        t = self.manifest["tensors"].get(tensor)
        for b in t["blocks"] if t is not None else ():
            if (b["row_start"], b["row_end"]) == (row_start, row_end):
                if "values" not in b:
                    raise KenError(f"tensor {tensor!r} rows [{row_start}, {row_end}) of fine-tune {self.finetune!r} "
                                   f"stores raw values, which have no scales to rescale")
                return b
        raise KenError(f"fine-tune {self.finetune!r} has no block {tensor!r} rows [{row_start}, {row_end})")

    def write(self, tensor: str, row_start: int, row_end: int, table: pa.Table) -> None:
        """Write the new part of a lossy block (same columns and rows as the stored one)."""
        b = self.block(tensor, row_start, row_end)
        expected = block_columns(b.get("index", "mask"), parse_codec(b["values"]))
        if tuple(table.column_names) != expected or table.num_rows != row_end - row_start:
            raise KenError(f"tensor {tensor!r} rows [{row_start}, {row_end}): a rescaled part needs columns "
                           f"{list(expected)} and {row_end - row_start} rows, got {table.column_names}, {table.num_rows}")
        data = part_bytes(table)
        rel = self.store._part_rel(self.finetune, tensor, _block_leaf(row_start, row_end).replace(
            ".parquet", f"-fit{self.generation}.parquet"))
        atomic_write(self.store.resolve(rel), data)
        b.update(file=rel, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def commit(self, fit: dict) -> dict:
        """Swap in the new manifest (byte totals updated, `fit` appended to `scale_fits`), then
        delete the replaced parts. Returns the new manifest."""
        m = self.manifest
        for t in m["tensors"].values():
            t["bytes"] = sum(b["bytes"] for b in t["blocks"])
        m["totals"]["bytes"] = sum(t["bytes"] for t in m["tensors"].values())
        m["scale_fits"] = [*m.get("scale_fits", []), {"fit": self.generation, "created": now(), **fit}]
        m["updated"] = now()
        atomic_json(self.store._manifest_path(self.finetune), m)
        self.committed = True
        self.store._drop_journal(self.finetune)
        self.store._collect_garbage(self.finetune, self.store._manifest_files(m))
        return m
