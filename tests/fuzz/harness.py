"""What every fuzz case shares: a private copy of the fixtures, the real entry points run in
process under a time limit, and the oracle (a clean error naming the file, or the right answer,
and nothing written outside the case's directory).

The CLI runs in this process through ken_dist.cli.main(argv), its stdout and stderr captured,
so hundreds of cases cost no interpreter start-ups; a case that hangs is stopped by SIGALRM.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sys
import traceback

from hypothesis import HealthCheck, settings
from store_helpers import same_bits  # noqa: F401  (bit equality, shared with the store tests)

from ken_dist.errors import KenError

LONG = os.environ.get("KEN_FUZZ_LONG", "") not in ("", "0")
CASE_SECONDS = 60 if LONG else 20  # hard limit per case (SIGALRM); hypothesis' deadline is softer


def examples(ci: int) -> int:
    """Cases per surface: `ci` in CI, 100x that with KEN_FUZZ_LONG=1 (KEN_FUZZ_EXAMPLES overrides)."""
    if os.environ.get("KEN_FUZZ_EXAMPLES"):
        return int(os.environ["KEN_FUZZ_EXAMPLES"])
    return ci * 100 if LONG else ci


def fuzz_settings(ci: int):
    """Hypothesis settings of one surface: derandomized in CI (the same cases every run, so a
    failure reproduces), random in the long run; no example database (read-only checkouts)."""
    return settings(max_examples=examples(ci), deadline=None, derandomize=not LONG, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
                    print_blob=True)


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that ran past CASE_SECONDS (BaseException: nothing in
    ken_dist may swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float = CASE_SECONDS):
    def _alarm(signum, frame):
        raise CaseTimeout(f"case ran past {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file (and directory) under root (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)  # a directory counts by its existence (its mtime moves with any entry)
            out[os.path.relpath(path, root)] = (0, 0) if os.path.isdir(path) else (st.st_size, st.st_mtime_ns)
    return out


def changed(before: dict, after: dict) -> set[str]:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def assert_writes_only_under(before: dict, after: dict, allowed: list[str]) -> None:
    """Every created, changed or removed path lies under one of `allowed` (relative prefixes), or
    is a directory created on the way to one (a new store's parents, as `mkdir -p` makes them)."""
    bad = sorted(p for p in changed(before, after)
                 if not any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed)
                 and not (after.get(p) == (0, 0) and any(a.startswith(p + "/") for a in allowed)))
    assert not bad, f"writes outside {allowed}: {bad[:10]}"


def copy_tree(src: str, dst: str) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@contextlib.contextmanager
def workspace(tmp_root: str, **trees: str):
    """A fresh directory holding copies of `trees` (name -> source directory); removed after."""
    os.makedirs(tmp_root, exist_ok=True)
    import tempfile

    case = tempfile.mkdtemp(prefix="case-", dir=tmp_root)
    try:
        for name, src in trees.items():
            copy_tree(src, os.path.join(case, name))
        yield case
    finally:
        shutil.rmtree(case, ignore_errors=True)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ken-dist ARGV` run in this process, under the time limit.

    An exception escaping main() is what a user would see as a traceback: it is printed into
    stderr here (as Python would) so that the oracle catches it."""
    from ken_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit():
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except CaseTimeout:
            raise
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            rc = 1
    return rc, out.getvalue(), err.getvalue()


def assert_cli_error(rc: int, err: str, *names: str) -> None:
    """The CLI refused cleanly: exit 2, one `ken-dist: error: ...` paragraph (or argparse's usage
    message), no traceback, and the message names each of `names` (a file, a field)."""
    assert "Traceback" not in err, f"traceback instead of an error message:\n{err}"
    assert rc == 2, f"exit {rc}, expected 2 (refused); stderr:\n{err}"
    assert err.startswith("ken-dist: error: ") or err.startswith("usage: "), f"not a ken-dist error:\n{err}"
    for name in names:
        assert name in err, f"the message does not name {name!r}:\n{err}"


def assert_ken_error(exc: BaseException, kinds: tuple[type, ...], *names: str) -> None:
    """A library refusal: a typed KenError subclass whose message names each of `names`."""
    assert isinstance(exc, KenError), f"{type(exc).__name__} instead of a KenError: {exc}"
    assert type(exc) is not KenError and isinstance(exc, kinds), \
        f"{type(exc).__name__}, expected one of {[k.__name__ for k in kinds]}: {exc}"
    for name in names:
        assert name in str(exc), f"the message does not name {name!r}: {exc}"


def library_call(fn, *args, **kw):
    """(result, None) or (None, exception) of fn under the time limit; anything but a KenError
    escapes (it is a bug, and the test fails with its traceback)."""
    with time_limit():
        try:
            return fn(*args, **kw), None
        except KenError as exc:
            return None, exc
