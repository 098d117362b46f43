import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py and fixtures import as modules

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "ken_reference_v1.npz"
if not GOLDEN.exists():  # a clone placed elsewhere: KEN_GOLDEN points at the file
    GOLDEN = Path(os.environ.get("KEN_GOLDEN", GOLDEN))


@pytest.fixture(scope="session")
def golden():
    """The 240 reference rows as a list of dicts (values, k, greedy, mask, family)."""
    if not GOLDEN.exists():
        pytest.fail(f"golden file not found at {GOLDEN}; set KEN_GOLDEN to shared/golden/ken_reference_v1.npz")
    data = np.load(GOLDEN)
    return [
        {
            "i": i,
            "values": data[f"values_{i}"],
            "k": int(data[f"k_{i}"]),
            "greedy": data[f"greedy_{i}"],
            "mask": data[f"mask_{i}"],
            "family": str(data[f"family_{i}"]),
        }
        for i in range(int(data["n_cases"]))
    ]


@pytest.fixture(scope="module")
def local_ray():
    """A private 2-CPU local Ray for one test module (pytestmark = pytest.mark.usefixtures("local_ray"))."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
