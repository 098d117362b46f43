"""Row generators shared by the kernel tests: weight-like, heavy-tailed, repeated, tied rows."""
import numpy as np
import torch


def row(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        return rng.standard_normal(n) * 0.02
    if kind == "cauchy":
        return rng.standard_cauchy(n) * 0.01
    if kind == "student2":
        return rng.standard_t(2, n) * 0.01
    if kind == "outliers":
        v = rng.standard_normal(n) * 0.01
        v[rng.integers(0, n, max(1, n // 50))] *= 300
        return v
    if kind == "bf16":  # bf16-rounded values: many exact repeats
        return torch.from_numpy(rng.standard_normal(n) * 0.05).to(torch.bfloat16).float().numpy()
    if kind == "zeros":
        v = rng.standard_normal(n)
        v[rng.random(n) < 0.3] = 0.0
        return v
    if kind == "bimodal":
        return np.where(rng.random(n) < 0.5, -1, 1) * 0.05 + rng.standard_normal(n) * 0.005
    if kind == "few_levels":
        return rng.integers(-3, 4, n) * 0.25
    if kind == "clustered":  # runs of adjacent float32 values: float32 distance ties
        base = np.float32(rng.choice([0.5, 1.0, 3.0]))
        v = base + rng.integers(0, 6, n).astype(np.float32) * np.spacing(base)
        far = rng.random(n) < 0.3
        v[far] = -rng.uniform(0.5, 4, int(far.sum()))
        return v
    return rng.uniform(-1, 1, n)


KINDS = ["gauss", "cauchy", "student2", "outliers", "bf16", "zeros", "bimodal", "few_levels", "clustered", "uniform"]
