"""The kernel is compiled once per machine, by the driver's child process, and the actors load
what it cached (ken_dist/runtime/warmup.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from ken_dist.runtime import warmup


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
    """An empty numba cache and a lock of its own, for this process and the children it starts."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the children's LOCK_FILE
    monkeypatch.setattr(warmup, "LOCK_FILE", os.path.join(str(tmp_path), os.path.basename(warmup.LOCK_FILE)))
    monkeypatch.setattr(warmup, "_driver_compile", None)
    return tmp_path


def _load_in_child(env) -> subprocess.Popen:
    script = textwrap.dedent("""
        from ken_dist.runtime import warmup
        calls = []
        compiled = warmup.load_kernel(lambda: calls.append(1))
        print(len(calls), compiled)
    """)
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_one_process_per_machine_compiles_the_others_load(fresh_machine):
    """Two processes load the kernel at once on a fresh cache: one compiles (and says so once),
    the other waits on the lock and loads the cache without compiling anything."""
    procs = [_load_in_child(dict(os.environ)) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sorted(out.split() for out, _ in outs) == [["0", "False"], ["1", "True"]]
    again = _load_in_child(dict(os.environ)).communicate(timeout=600)
    assert again[0].split() == ["0", "False"], again[1]


def test_a_cached_kernel_loads_side_by_side_and_a_stale_stamp_waits(fresh_machine):
    """Once a process has had the kernel cached (its stamp beside the lock), the next ones load
    under a shared lock, side by side, while another holds it shared; a stamp that no longer
    matches (another source, numba, cache directory) sends them to the exclusive lock, to wait."""
    first = _load_in_child(dict(os.environ)).communicate(timeout=600)
    assert first[0].split() == ["1", "True"], first[1]
    with warmup.machine_lock(shared=True):  # another process loading
        out, err = _load_in_child(dict(os.environ)).communicate(timeout=120)
        assert out.split() == ["0", "False"], err
    with open(warmup._stamp_file(), "a") as f:
        f.write("another numba")
    with warmup.machine_lock(shared=True):
        child = _load_in_child(dict(os.environ))
        with pytest.raises(subprocess.TimeoutExpired):
            child.communicate(timeout=5)  # waits for the exclusive lock
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0 and out.split() == ["0", "False"], err
    assert warmup.kernel_cached()  # stamped again


def test_a_command_starts_no_compile_child_where_the_kernel_is_cached(fresh_machine):
    """The driver's child only where the machine has not had the kernel cached; once it has, a
    command's jobs get none (the actors load it themselves), unless the command started one."""
    kernel = warmup.compile_if_needed()
    assert kernel is not None and warmup.compile_if_needed() is kernel
    kernel.proc.wait(timeout=600)
    kernel._thread.join()
    assert kernel.ready.is_set() and warmup.kernel_cached()
    assert warmup.compile_if_needed() is kernel  # the job of the command that started it hears it
    warmup._driver_compile = None  # the next command on this machine
    assert warmup.compile_if_needed() is None


def test_the_driver_compiles_in_a_child_and_tells_the_job_once(fresh_machine):
    """The driver's child compiles on a fresh cache; what it said before the job listened is told
    to the job when it does (the demo starts the child before the job), each event once, and a
    later listener hears nothing. The next command's child loads the cache: no event at all."""
    kernel = warmup.start_compile()
    assert warmup.start_compile() is kernel  # one per driver process
    kernel.proc.wait(timeout=600)
    kernel._thread.join()
    assert kernel.ready.is_set() and kernel.error is None and kernel.compiled
    heard = []
    kernel.report_to(lambda: heard.append("compiling"), lambda s: heard.append(("compiled", s > 0)))
    assert heard == ["compiling", ("compiled", True)]
    kernel.report_to(lambda: heard.append("again"), lambda s: heard.append("again"))
    assert len(heard) == 2

    warm = warmup.KernelCompile()  # the next command on this machine
    warm.report_to(lambda: heard.append("warm"), lambda s: heard.append("warm"))
    warm.proc.wait(timeout=600)
    warm._thread.join()
    assert warm.ready.is_set() and not warm.compiled and len(heard) == 2


def test_actors_wait_for_the_compiling_child_then_load_its_cache(fresh_machine):
    """An actor's first unit (load_kernel) started while the driver's child compiles waits on the
    machine's lock, and loads what the child cached instead of compiling it again."""
    kernel = warmup.start_compile()
    started = threading.Event()
    kernel.report_to(started.set)
    assert started.wait(600)  # the child holds the lock and compiles
    actor = _load_in_child(dict(os.environ))
    out, err = actor.communicate(timeout=600)
    assert actor.returncode == 0 and out.split() == ["0", "False"], err
    assert kernel.ready.wait(600) and kernel.compiled


def test_a_failed_compile_is_reported_and_started_again(fresh_machine, monkeypatch):
    monkeypatch.setattr(warmup, "CHILD", [sys.executable, "-c", "import sys; print('LLVM ERROR: out of memory'); "
                                                                "sys.exit(3)"])
    kernel = warmup.start_compile()
    kernel.proc.wait(timeout=60)
    kernel._thread.join()
    assert kernel.error == "LLVM ERROR: out of memory" and not kernel.ready.is_set()
    monkeypatch.setattr(warmup, "CHILD", [sys.executable, "-c", "pass"])
    again = warmup.start_compile()
    assert again is not kernel
    again.proc.wait(timeout=60)
    again._thread.join()
    assert again.ready.is_set() and again.error is None


def test_stop_ends_a_child_still_compiling(fresh_machine, monkeypatch):
    monkeypatch.setattr(warmup, "CHILD", [sys.executable, "-c", "import time; time.sleep(600)"])
    kernel = warmup.start_compile()
    kernel.stop()
    assert kernel.proc.returncode is not None and kernel.error is not None and not kernel.ready.is_set()
