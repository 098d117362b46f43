"""ken_dist: KEN pruning of fine-tuned transformer checkpoints, distributed on Ray."""
from ken_dist.errors import KenError
from ken_dist.kernel import STRATEGIES, ken_select, register, select
from ken_dist.inject import apply, swap
from ken_dist.loader import inspect_store, materialize, open_subnetwork
from ken_dist.model_load import load_model

__version__ = "0.1.0"
__all__ = ["KenError", "ken_select", "select", "register", "STRATEGIES", "__version__",
           "open_subnetwork", "load_model", "apply", "swap", "materialize", "inspect_store"]
