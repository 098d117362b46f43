"""The `ken-dist` command line: commands.py (one function per verb over the library), ray_jobs.py (Ray Jobs verbs),
demo.py (the README's first command), summary.py (what is printed after work)."""
from ken_dist.cli.commands import main

__all__ = ["main"]
