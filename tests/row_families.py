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
    if kind == "sparse_outliers":  # weight-like: 0.2% of entries 20x larger
        v = rng.standard_normal(n) * 0.02
        v[rng.random(n) < 0.002] *= 20
        return v
    if kind == "laplace":
        return rng.laplace(0.0, 0.02, n)
    if kind == "student3":
        return rng.standard_t(3, n) * 0.02
    if kind == "delta":  # a fine-tuning delta's scale: the densities are ~100x larger integers
        return rng.standard_normal(n) * 2e-4
    if kind == "tiny":  # a small-learning-rate fp32 delta: densities ~1e8, huge integers
        return rng.standard_normal(n) * 1e-8
    if kind == "near_constant":  # LayerNorm-like: float32 steps of 1.0 are 1.2e-7, so many ties
        return 1.0 + rng.standard_normal(n) * 1e-4
    if kind == "uniform_weights":
        return rng.uniform(-0.03, 0.03, n)
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, n) * 0.01
    if kind == "exponential":
        return rng.exponential(0.02, n)
    if kind == "ramp":
        return np.linspace(-1, 1, n) + rng.standard_normal(n) * 1e-3
    if kind == "int8":  # int8-quantized-like: 41 levels
        return np.round(rng.standard_normal(n) * 20) / 20 * 0.05
    if kind == "repeats":  # float32 weights with a few exact repeats (1 in 20 entries copies another)
        v = (rng.standard_normal(n) * 0.02).astype(np.float32)
        copies = rng.random(n) < 0.05
        v[copies] = rng.choice(v, int(copies.sum()))
        return v
    if kind == "offset":  # 0.01 + 1e-7 noise: ~200 float32 levels, a grid finer than their spacing
        return 0.01 + rng.standard_normal(n) * 1e-7
    return rng.uniform(-1, 1, n)


KINDS = ["gauss", "cauchy", "student2", "outliers", "bf16", "zeros", "bimodal", "few_levels", "clustered", "uniform",
         "sparse_outliers", "uniform_weights", "laplace", "student3", "delta", "near_constant", "tiny", "repeats"]
