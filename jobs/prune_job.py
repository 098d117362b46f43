"""Ray Job entrypoint that needs no installed ken-dist: `python jobs/prune_job.py JOB.yaml [...]`.

With `ray job submit --working-dir .` the repository is the job's working directory; this puts
it on sys.path and runs `ken-dist prune --job JOB.yaml [...]`, so a stock Ray image with the
dependencies of pyproject.toml installed is enough.
Where ken-dist is installed, `ken-dist prune --job JOB.yaml` is the same thing.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ken_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python jobs/prune_job.py JOB.yaml [ken-dist prune options]")
    sys.exit(main(["prune", "--job", *sys.argv[1:]]))
