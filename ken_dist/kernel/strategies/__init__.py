"""Selection strategies: the registry, and the built-in rules registered on import.

Importing this package registers ken, magnitude, random (baselines.py) and the delta-aware rules
(delta.py); `budget.py` spreads a model-scope strategy's one budget over the blocks.
"""
from ken_dist.kernel.strategies import baselines, delta  # noqa: F401  (registration)
from ken_dist.kernel.strategies.registry import (
    STRATEGIES,
    Strategy,
    get_strategy,
    register,
)

__all__ = ["STRATEGIES", "Strategy", "get_strategy", "register"]
