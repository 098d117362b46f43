"""The only part of ken_dist that imports Ray: the driver and its selection actors.

run_job is imported on first use, so that a process importing one submodule (the kernel's
compile child runs ken_dist.runtime.warmup) does not import Ray and the driver with it."""

__all__ = ["run_job"]


def __getattr__(name: str):
    if name == "run_job":
        from ken_dist.runtime.driver import run_job

        globals()[name] = run_job
        return run_job
    raise AttributeError(f"module 'ken_dist.runtime' has no attribute {name!r}")
