"""ken_dist: KEN pruning of fine-tuned transformer checkpoints, distributed on Ray."""
from ken_dist.errors import KenError
from ken_dist.kernel import STRATEGIES, ken_select, register, select

__version__ = "0.1.0"
__all__ = ["KenError", "ken_select", "select", "register", "STRATEGIES", "__version__"]
