"""Filesystem primitives of the store: safe path components and crash-safe writes.

Why here and not in store.py: they are the two guarantees everything else leans on, and they
are easier to audit alone. A name becomes a path component only through `escape_name`, so no
fine-tune or tensor name can climb out of the store; a file is published only through
`atomic_write`/`publish` (tmp in the same directory, fsync, rename, fsync of the directory),
so a reader sees the old file or the whole new one, even across a power cut.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from datetime import datetime, timezone

from ken_dist.errors import KenError

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_ESCAPED = 200  # bytes; leaves room under NAME_MAX (255) for tmp-file decorations


def escape_name(name: str) -> str:
    """A path component for `name`: %XX (UTF-8, upper-case hex) for every char outside
    [A-Za-z0-9._-], a leading '.' written %2E, and names escaping past MAX_ESCAPED bytes cut
    and suffixed with '~' + 32 hex of sha256(name) ('~' never appears otherwise)."""
    if not isinstance(name, str) or not name:
        raise KenError(f"names in a store must be non-empty strings, got {name!r}")
    out = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
                  for c in name)
    if out.startswith("."):
        out = "%2E" + out[1:]
    if len(out) > MAX_ESCAPED:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        out = out[: MAX_ESCAPED - 33] + "~" + digest
    return out


def unescape_name(escaped: str) -> str:
    """Inverse of escape_name for names that were not shortened (no '~')."""
    if "~" in escaped:
        raise KenError(f"{escaped!r} is a shortened name; read the full name from the manifest")
    raw, i = bytearray(), 0
    while i < len(escaped):
        if escaped[i] == "%":
            raw.append(int(escaped[i + 1: i + 3], 16))
            i += 3
        else:
            raw += escaped[i].encode()
            i += 1
    return raw.decode("utf-8", "surrogatepass")


def last_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: str) -> str:
    d, b = os.path.split(path)
    return os.path.join(d, f".{b[:120]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def publish(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path))


@contextlib.contextmanager
def atomic_output(path: str, *, durable: bool = True):
    """Yield a tmp path beside `path` to write; on success fsync it and publish it as `path`, on
    any error remove it. So `path` holds its old content or all of the new, never part of it.
    durable=False skips the fsyncs: still whole or absent for readers while the machine runs (a
    killed process included), but a power cut may leave any content; for files that carry their
    own check (a checksum) and can be recomputed."""
    tmp = tmp_path(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
            publish(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str, data) -> None:
    """Write bytes so that `path` holds either its old content or all of `data`."""
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_json(path: str, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def append_jsonl(path: str, *objs, default=None) -> None:
    """Append one JSON line per object and fsync once. One write(2) on an O_APPEND descriptor, so
    lines from concurrent writers never interleave; a torn last line (a crash mid-write) is skipped
    by read_jsonl, and the next append starts on a fresh line. `default` as in json.dumps (None:
    a value JSON cannot hold is a TypeError, not a string)."""
    if not objs:
        return
    data = "".join(json.dumps(obj, sort_keys=True, default=default) + "\n" for obj in objs).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and last_byte(path) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str) -> list:
    """Every line of `path` that parses as JSON (torn or garbled lines are skipped)."""
    out = []
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def prefetch(paths) -> None:
    """Ask the kernel to start reading `paths` into the page cache now (posix_fadvise WILLNEED),
    in order: a reader working through them in another thread then finds them read, so the disk
    and its decoding overlap. Best effort: a file that cannot be opened is left to the reader."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
