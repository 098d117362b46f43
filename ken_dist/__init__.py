"""ken_dist: KEN pruning of fine-tuned transformer checkpoints, distributed on Ray.

The public names below are imported on first use, so that importing a submodule (a CPU
selection actor imports ken_dist.runtime.actors) does not pull in torch and transformers."""
from ken_dist.errors import KenError

__version__ = "0.1.0"
_LAZY = {
    "ken_select": "ken_dist.kernel", "select": "ken_dist.kernel", "register": "ken_dist.kernel",
    "STRATEGIES": "ken_dist.kernel", "apply": "ken_dist.subnetwork.inject", "swap": "ken_dist.subnetwork.inject",
    "inspect_store": "ken_dist.subnetwork.inspect", "materialize": "ken_dist.subnetwork.materialize",
    "open_subnetwork": "ken_dist.subnetwork.view", "load_model": "ken_dist.subnetwork.load_model",
    "Switcher": "ken_dist.subnetwork.switcher", "fit_scales": "ken_dist.subnetwork.fit_scales",
}
__all__ = ["KenError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ken_dist' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
