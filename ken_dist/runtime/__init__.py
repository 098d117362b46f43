"""The only part of ken_dist that imports Ray: the driver and its selection actors."""
from ken_dist.runtime.driver import run_job

__all__ = ["run_job"]
