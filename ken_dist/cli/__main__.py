"""`python -m ken_dist.cli VERB ...`: the ken-dist command without its console script."""
import sys

from ken_dist.cli.commands import main

sys.exit(main())
