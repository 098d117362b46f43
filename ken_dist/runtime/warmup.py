"""Compile the CPU selection kernel once per machine, while blocks already run.

numba compiles KEN's CPU kernel the first time a machine runs it (tens of seconds) and caches
the result on disk. The driver and every CPU actor start a KernelWarmUp; a per-user lock file
makes one process on the machine compile while the others wait for it and then load the cache.
Until its warm-up is ready an actor selects with the kernel's torch path on the CPU, which gives
the same masks bit for bit (tests/test_kernel_torch.py) without compiling anything, so no one
sits idle on the compiler and no two processes compile the same code.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time

try:
    import fcntl
except ImportError:  # Windows: no lock; each process compiles or loads on its own
    fcntl = None

LOCK_FILE = os.path.join(tempfile.gettempdir(), f"ken-dist-kernel-{os.getuid() if hasattr(os, 'getuid') else 0}.lock")
MARKER_FILE = LOCK_FILE + ".compiling"  # holds the pid of the process compiling now
POLL_S = 0.05  # how often a waiting process retries the lock


def _marker_pid() -> int:
    """The pid in the compiling marker; 0 if there is none (or it is being written)."""
    try:
        with open(MARKER_FILE) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def compiling_elsewhere() -> bool:
    """Whether another live process on this machine is compiling the kernel now."""
    pid = _marker_pid()
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # a compiler killed before it cleaned up
    except PermissionError:
        return True
    return True


class KernelWarmUp(threading.Thread):
    """Loads or compiles the kernel in the background: `ready` is set when it can be called
    without compiling; `error` holds what went wrong (the kernel's own call then raises it again
    where it is used). on_compile() is called once if this process really compiles."""

    def __init__(self, on_compile=None, while_waiting=None):
        super().__init__(name="ken-kernel-warm-up", daemon=True)
        self.on_compile = on_compile
        self.while_waiting = while_waiting  # called if another process is compiling (e.g. import torch)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        from ken_dist.kernel.ken_cpu import warm_up

        def compiling():
            with open(MARKER_FILE, "w") as f:
                f.write(str(os.getpid()))
            if self.on_compile is not None:
                self.on_compile()

        try:
            with open(LOCK_FILE, "a") as lock:
                if fcntl is not None:
                    self._take(lock)
                try:
                    warm_up(compiling)
                finally:
                    if _marker_pid() == os.getpid():  # this process compiled: its marker goes
                        os.unlink(MARKER_FILE)
            self.ready.set()
        except BaseException as exc:  # noqa: BLE001  (kept for the caller: see `error`)
            self.error = exc

    def _take(self, lock) -> None:
        """The machine's lock (released when the file closes, or the process dies); while another
        process holds it, while_waiting() runs once if that process turns out to be compiling."""
        prepared = self.while_waiting is None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not prepared and compiling_elsewhere():
                    prepared = True
                    self.while_waiting()
                time.sleep(POLL_S)

    def settled(self, wait_s: float = 0.0) -> bool:
        """Whether the compiled kernel can be used now (or its failure reported by using it),
        after waiting up to wait_s seconds for it."""
        if self.error is None:
            self.ready.wait(wait_s)
        return self.ready.is_set() or self.error is not None


# Loading the kernel from numba's cache takes about a second: a first unit waits that long rather
# than import torch for nothing, unless another process is known to be compiling it.
LOAD_GRACE_S = 3.0


def cpu_device_for(strategy, warm: KernelWarmUp | None, wait_s: float = 0.0) -> str:
    """The CPU actor's device for a unit of `strategy` (a registry Strategy): "torch" (the
    kernel's torch path on the CPU, same masks) while the compiled kernel it would use is not
    ready after wait_s seconds, else "cpu"."""
    if strategy.compiled_kernel and warm is not None and not warm.settled(0.0):
        if compiling_elsewhere() or not warm.settled(wait_s):
            return "torch"
    return "cpu"
