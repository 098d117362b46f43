"""Compile the CPU selection kernel once per machine, as early as the command can.

numba compiles KEN's CPU kernel the first time a machine runs it (about 10 CPU seconds) and
caches the result on disk; loading the cache takes about a third of a second. A per-user lock
file makes one process on the machine compile while the others wait for it and then load the
cache; once a process has had the kernel cached it leaves a stamp (the source file's size and
mtime, numba's and Python's versions, the cache directory) beside the lock, and later processes
that find it load under a shared lock, side by side (three processes loading one after another
made a 2-worker job's second actor start ~0.7 s late).

The driver starts the compilation first, in a child process (`KernelCompile`, `python -m
ken_dist.runtime.warmup`), so that it runs on another core while the command imports, plans and
starts Ray (a thread in the driver would share the driver's GIL with that work). A CPU actor's
first unit that needs the kernel takes the lock (`load_kernel`): it waits while the driver's
child compiles, then loads the cache. Actors wait rather than select on the kernel's torch path
meanwhile: on the CPU that path costs 15-30x the compiled kernel's CPU time per row, so where
the actors share the cores with the compiler it delays the compilation more than it gets done,
and CPU actors need not import torch (docs/performance.md, "The first run").
"""
from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback

try:
    import fcntl
except ImportError:  # Windows: no lock; each process compiles or loads on its own
    fcntl = None

LOCK_FILE = os.path.join(tempfile.gettempdir(), f"ken-dist-kernel-{os.getuid() if hasattr(os, 'getuid') else 0}.lock")
COMPILING = "compiling"  # the child's line when numba really compiles (not when it loads the cache)
CHILD = [sys.executable, "-m", "ken_dist.runtime.warmup"]  # the driver's compile child (main() below)
NOTE = "compiling the selection kernel (first run on this machine; once: the blocks start when it is cached)"


@contextlib.contextmanager
def machine_lock(shared: bool = False):
    """The machine's kernel lock, held until the block ends (or the process dies): exclusive to
    compile, shared to load a cache that a process already compiled or loaded."""
    with open(LOCK_FILE, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernel", "ken_numba.py")


def _cache_stamp() -> str:
    """What numba's cache of the kernel depends on (its source file, by path, size and mtime, as
    numba keys it; numba's and Python's versions; the cache directory), read without importing
    numba: a command asks before its own imports."""
    from importlib.metadata import version

    st = os.stat(KERNEL_SOURCE)
    return "\n".join([KERNEL_SOURCE, str(st.st_size), str(st.st_mtime_ns), version("numba"), sys.version,
                      os.environ.get("NUMBA_CACHE_DIR", "")])


def _stamp_file() -> str:
    return LOCK_FILE + ".cached"  # beside the lock: one per user and temporary directory


def kernel_cached() -> bool:
    """Whether a process on this machine has had this kernel in numba's cache (the stamp it left)."""
    try:
        with open(_stamp_file()) as f:
            return f.read() == _cache_stamp()
    except OSError:
        return False


def _mark_cached() -> None:
    tmp = f"{_stamp_file()}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(_cache_stamp())
    os.replace(tmp, _stamp_file())


def load_kernel(on_compile=None, side_by_side: bool = False) -> bool:
    """Load the compiled kernel into this process, compiling it if no process on this machine
    has (on_compile() is called then, once); waits while another process compiles it. Returns
    whether this process compiled.

    side_by_side (it forks, so only for a process of its own: the compile child): a fork
    compiles the density while this process compiles the rest, then select_block finds both in
    numba's cache. Once Ray is up the driver leaves a core idle, which the fork takes."""
    from ken_dist.kernel import ken_cpu

    if kernel_cached():  # loads side by side: the driver's child and a job's actors do not queue
        with machine_lock(shared=True):
            return ken_cpu.warm_up(on_compile)  # compiles only if the cache was deleted since
    with machine_lock():
        helper = _fork(ken_cpu.compile_density) if side_by_side and hasattr(os, "fork") else None
        if helper is None:
            compiled = ken_cpu.warm_up(on_compile)
        else:
            def first():
                ken_cpu.compile_all_but_density()
                os.waitpid(helper, 0)  # however it ended: select_block compiles what is not cached

            compiled = ken_cpu.warm_up(on_compile, first)
        _mark_cached()
        return compiled


def _fork(work) -> int:
    """Run work() in a forked child that leaves by os._exit (never into the caller's code); its
    pid. Forked before any listener is installed: the child says nothing on stdout."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:  # noqa: BLE001 - said on stderr; the parent compiles what is not cached
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


class KernelCompile:
    """The driver's compilation: a child process that loads or compiles the kernel into numba's
    cache. `ready` is set when it finished, `error` holds why it failed (each actor then meets
    the failure again where it loads the kernel); `compiled` says whether it really compiled,
    and report_to() whom to tell when it starts and when it ends doing so."""

    def __init__(self):
        self.ready = threading.Event()
        self.error: str | None = None
        self.compiled = False
        self._since = 0.0  # when the child said it compiles
        self._mutex = threading.Lock()
        self._listener = None
        self._untold: list = []  # what happened while no one listened: told to the next listener
        # the child imports this very package (numba's cache is keyed by the source file's path)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = subprocess.Popen(CHILD, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self._thread = threading.Thread(target=self._follow, name="ken-kernel-compile", daemon=True)
        self._thread.start()

    def report_to(self, on_compiling=None, on_compiled=None) -> None:
        """on_compiling() when the child starts compiling, on_compiled(seconds) when it has the
        kernel cached, each only if it really compiles (not when it loads the cache); both now
        for what happened while no one listened. report_to() with no arguments stops listening.
        The callbacks run one at a time, in order (they must not call report_to)."""
        with self._mutex:
            self._listener = (on_compiling, on_compiled) if on_compiling or on_compiled else None
            if self._listener is not None:
                untold, self._untold = self._untold, []
                for which, args in untold:
                    self._tell(which, args)

    def _event(self, which: int, *args) -> None:
        with self._mutex:
            if self._listener is None:
                self._untold.append((which, args))
            else:
                self._tell(which, args)

    def _tell(self, which: int, args) -> None:
        if self._listener[which] is not None:
            self._listener[which](*args)

    @property
    def done(self) -> bool:
        return self.ready.is_set() or self.error is not None

    def _follow(self) -> None:
        said = []  # the child's other output (a traceback when it fails)
        for line in self.proc.stdout:
            if line.strip() == COMPILING:
                self.compiled, self._since = True, time.monotonic()
                self._event(0)
            else:
                said = [*said[-20:], line.rstrip()]
        code = self.proc.wait()
        if code == 0:
            self.ready.set()
            if self.compiled:
                self._event(1, time.monotonic() - self._since)
        else:
            self.error = next((line for line in reversed(said) if line.strip()), f"exit status {code}")

    def stop(self) -> None:
        """End the child if it still runs (numba keeps every function it finished cached)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self._thread.join()


_driver_compile: KernelCompile | None = None


def start_compile() -> KernelCompile:
    """This process's KernelCompile: started on the first call (or again after one that failed
    or was stopped), the same one after, so a command can start it before its own imports and
    the job it runs later finds it under way."""
    global _driver_compile
    if _driver_compile is None or _driver_compile.error is not None:
        _driver_compile = KernelCompile()
        atexit.register(_driver_compile.stop)  # a command that ends first leaves no compiler running
    return _driver_compile


def compile_if_needed() -> KernelCompile | None:
    """start_compile() on a machine that has not had the kernel cached; None where it has (each
    actor loads it in a third of a second: a child process loading it too only takes a core
    from the actors starting beside it). Should the cache have been deleted since its stamp, the
    actors compile it themselves, side by side."""
    if _driver_compile is not None and _driver_compile.error is None:
        return _driver_compile  # this command started one already: its job hears what it says
    return None if kernel_cached() else start_compile()


def main() -> int:
    """The child of KernelCompile: says COMPILING on stdout when numba really compiles."""
    load_kernel(lambda: print(COMPILING, flush=True), side_by_side=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
