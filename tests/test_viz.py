"""KENviz: exact statistics (vs brute force and exhaustive enumeration), figures and index.html
written from a small store pruned by the real pipeline (run_job on a private local Ray)."""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ken_dist.viz import stats as S

# ---- pure statistics ---------------------------------------------------------------------------


def brute_counts(mask: np.ndarray) -> np.ndarray:
    r, c = mask.shape
    out = np.zeros((r, c), int)
    for i in range(r):
        for j in range(c):
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                a, b = i + di, j + dj
                if 0 <= a < r and 0 <= b < c and mask[a, b]:
                    out[i, j] += 1
    return out


def brute_hist(mask: np.ndarray) -> list[int]:
    cnt = brute_counts(mask)
    return [int(((cnt == j) & mask).sum()) for j in range(5)]


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (2, 2), (5, 9), (17, 13)])
def test_neighbour_counts_match_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.3, 0.7, 1.0):
        mask = rng.random(shape) < density
        assert np.array_equal(S.neighbour_counts(mask), brute_counts(mask))
        assert S.observed_histogram(mask).tolist() == brute_hist(mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 9), (7, 1), (2, 2), (2, 5), (3, 3), (14336, 4096)])
def test_degree_counts(shape):
    r, c = shape
    got = S.degree_counts(r, c)
    assert got.sum() == r * c
    if r * c <= 100:
        ones = np.ones(shape, bool)
        assert got.tolist() == [int((brute_counts(ones) == d).sum()) for d in range(5)]
    else:
        assert got.tolist() == [0, 0, 4, 2 * (r - 2) + 2 * (c - 2), (r - 2) * (c - 2)]


@pytest.mark.parametrize("shape,m", [((1, 1), 1), ((1, 5), 2), ((4, 1), 4), ((3, 3), 1), ((3, 3), 4),
                                     ((3, 4), 12), ((13, 17), 60), ((14336, 4096), 14336 * 1024),
                                     ((2, 384), 1)])
def test_expected_pmf_sums_to_one(shape, m):
    pmf = S.expected_pmf(*shape, m)
    assert pmf.shape == (5,) and (pmf >= 0).all()
    assert math.isclose(pmf.sum(), 1.0, rel_tol=0, abs_tol=1e-12)


@pytest.mark.parametrize("shape,m", [((3, 3), 3), ((2, 4), 5), ((1, 6), 2), ((4, 3), 6)])
def test_expected_pmf_is_exact_by_enumeration(shape, m):
    """Average, over every m-subset of the grid, of the fraction of kept entries with j kept neighbours."""
    r, c = shape
    n = r * c
    total = np.zeros(5)
    subsets = 0
    for kept in itertools.combinations(range(n), m):
        mask = np.zeros(n, bool)
        mask[list(kept)] = True
        total += np.array(brute_hist(mask.reshape(r, c))) / m
        subsets += 1
    assert np.allclose(S.expected_pmf(r, c, m), total / subsets, rtol=0, atol=1e-12)


def test_expected_mean_at_large_density_is_about_four_times_density():
    pmf = S.expected_pmf(4096, 4096, 4096 * 1024)
    mean = (np.arange(5) * pmf).sum()
    assert abs(mean - 4 * (4096 * 1024 - 1) / (4096 * 4096 - 1)) < 0.002


@pytest.mark.parametrize("factor", [1, 2, 3, 5])
def test_block_sums_are_exact_in_chunks(factor):
    rng = np.random.default_rng(factor)
    vals = rng.standard_normal((23, 11))
    _, whole = S.block_sums(vals, factor, factor)
    acc = np.zeros_like(whole)
    for a, b in ((0, 4), (4, 5), (5, 17), (17, 23)):
        idx, part = S.block_sums(vals[a:b], factor, factor, row0=a)
        acc[idx] += part
    brute = np.array([[vals[i:i + factor, j:j + factor].sum() for j in range(0, 11, factor)]
                      for i in range(0, 23, factor)])
    assert np.allclose(whole, brute) and np.allclose(acc, brute)


# ---- a small store through the real pipeline ---------------------------------------------------

TENSORS = {
    "model.layers.0.mlp.w.weight": ((13, 17), torch.float32),
    "model.layers.1.mlp.w.weight": ((13, 17), torch.float32),
    "model.layers.0.attn.q.weight": ((8, 8), torch.bfloat16),
    "model.embed.weight": ((40, 9), torch.bfloat16),
    "model.conv.weight": ((3, 5, 4), torch.float32),
    "model.norm.weight": ((17,), torch.float32),
    "model.steps": ((3,), torch.int64),
}
KEEP = 0.3


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec
    from ken_dist.runtime import run_job

    root = tmp_path_factory.mktemp("viz")
    gen = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for name, (shape, dtype) in TENSORS.items():
        if dtype.is_floating_point:
            b = torch.randn(shape, generator=gen) * 0.02
            f = b + torch.randn(shape, generator=gen) * 0.002
            base[name], ft[name] = b.to(dtype), f.to(dtype)
        else:
            base[name] = ft[name] = torch.arange(3)
    for d, sd in (("base", base), ("ft", ft)):
        os.makedirs(root / d)
        save_file(sd, str(root / d / "model.safetensors"))
        (root / d / "config.json").write_text("{}")
    store = root / "store"
    job = JobSpec(base=str(root / "base"), store=str(store), block_bytes=96, finetunes=(
        FineTuneEntry("ken", str(root / "ft"), None, PruneParams(keep=KEEP)),
        FineTuneEntry("mag", str(root / "ft"), None, PruneParams(strategy="magnitude", keep=KEEP))))
    run_job(job, workers=1, quiet=True)
    return {"store": str(store), "base": base, "ft": ft, "root": root}


def _expected_mask(pruned, name, strategy="ken"):
    from ken_dist import select

    f = pruned["ft"][name]
    rows = f.shape[0] if f.dim() > 1 else 1
    b = pruned["base"][name].reshape(rows, -1)
    return select(strategy, f.reshape(rows, -1), b, keep=KEEP).numpy()


@pytest.mark.parametrize("name", [n for n, (s, d) in TENSORS.items() if len(s) >= 2])
def test_loaded_mask_and_stats_are_exact(pruned, name):
    from ken_dist.viz import load_matrix

    v = load_matrix(pruned["store"], "ken", name, max_pixels=4)
    want = _expected_mask(pruned, name)
    assert np.array_equal(v.mask, want)
    s = v.stats
    assert s["kept"] == int(want.sum()) and s["rows"] * s["cols"] == want.size
    assert s["observed_hist"] == brute_hist(want)
    assert math.isclose(sum(s["expected_fraction"]), 1.0, abs_tol=1e-12)
    assert s["expected_fraction"] == S.expected_pmf(*want.shape, int(want.sum())).tolist()
    assert s["kept_per_row"]["min"] == s["kept_per_row"]["max"] == int(want[0].sum())
    # aggregated images: exact block sums of the mask
    f = v.factor
    assert f == S.display_factor(*want.shape, 4) and f > 1
    brute = np.array([[want[i:i + f, j:j + f].sum() for j in range(0, want.shape[1], f)]
                      for i in range(0, want.shape[0], f)])
    assert np.array_equal(v.kept_sum, brute)


def test_value_and_delta_images_at_full_resolution(pruned):
    from ken_dist.viz import load_matrix

    name = "model.embed.weight"
    want = _expected_mask(pruned, name)
    ft = pruned["ft"][name].float().numpy()
    base = pruned["base"][name].float().numpy()
    v = load_matrix(pruned["store"], "ken", name)
    assert v.factor == 1
    img = v.value_image()
    assert np.array_equal(np.isnan(img), ~want)
    assert np.array_equal(img[want], ft[want])
    d = load_matrix(pruned["store"], "ken", name, delta=True)
    assert np.allclose(d.value_image()[want], (ft - base)[want], rtol=0, atol=1e-7)
    nb = v.neighbour_image()
    assert np.array_equal(nb[want], brute_counts(want)[want])


def test_a_part_whose_rows_disagree_with_its_block_is_refused(pruned, tmp_path):
    """KENviz decodes parts with the loader's checks: a part holding other rows than its block
    (here its row numbers shifted by one; verify=False skips the sha256) is an error, not a figure."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ken_dist.errors import StoreError
    from ken_dist.store.protocol import Store
    from ken_dist.viz import load_matrix

    store = tmp_path / "store"
    shutil.copytree(pruned["store"], store)
    name = "model.embed.weight"
    block = Store(store).manifest("ken")["tensors"][name]["blocks"][1]
    path = store / block["file"]
    table = pq.read_table(path)
    table = table.set_column(0, "row", pa.compute.add(table.column("row"), 1))
    pq.write_table(table, path)
    with pytest.raises(StoreError, match=rf"{re.escape(str(path))}.*{re.escape(name)}.*rows are not"):
        load_matrix(str(store), "ken", name, verify=False)


def test_a_base_with_the_same_header_but_other_bytes_is_refused(pruned, tmp_path):
    """KENviz reaches the base through subnetwork/base.py, sample_sha256 included: a checkpoint
    with the very same header (another fine-tune of one architecture) cannot pose as the base."""
    from ken_dist.errors import CheckpointError
    from ken_dist.viz import load_matrix

    other = tmp_path / "other"
    shutil.copytree(pruned["root"] / "base", other)
    data = bytearray((other / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data; the header is untouched
    (other / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="same header but other tensor bytes"):
        load_matrix(pruned["store"], "ken", "model.embed.weight", base=str(other), delta=True)


def test_render_writes_figures_index_and_stats(pruned, tmp_path):
    from ken_dist.viz import render

    out = tmp_path / "viz"
    res = render(pruned["store"], "mag", r"^model\.", str(out), delta=True)
    names = [n for n, (s, d) in TENSORS.items() if len(s) >= 2]
    assert sorted(s["tensor"] for s in res["stats"]) == sorted(names)
    for path in res["figures"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(out / "layers" / "model.layers.L.mlp.w.weight.png")  # 2 layers -> one grid
    assert len(res["figures"]) == 2 * len(names) + 1
    html = (out / "index.html").read_text()
    for path in res["figures"]:
        assert os.path.relpath(path, out) in html
    stats = json.loads((out / "stats.json").read_text())
    assert stats["finetune"] == "mag" and len(stats["matrices"]) == len(names)
    for s in stats["matrices"]:
        want = _expected_mask(pruned, s["tensor"], "magnitude")
        assert s["observed_hist"] == brute_hist(want)


def test_figures_leave_the_matplotlib_backend_alone(pruned, tmp_path):
    """A notebook keeps its backend: importing KENviz and making and saving every figure neither
    switches matplotlib's backend nor imports pyplot (fresh interpreter: a clean sys.modules)."""
    code = f"""
import sys
import matplotlib
matplotlib.use("svg")
from ken_dist import viz
v = viz.load_matrix({pruned["store"]!r}, "ken", "model.embed.weight", max_pixels=4)
w = viz.load_matrix({pruned["store"]!r}, "ken", "model.layers.0.mlp.w.weight")
for i, fig in enumerate((viz.plot_matrix(v), viz.plot_neighbours(w), viz.plot_layers([v, w]))):
    viz.save(fig, {str(tmp_path)!r} + f"/{{i}}.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False"]
    for i in range(3):
        assert (tmp_path / f"{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_viz(pruned, tmp_path, capsys):
    from ken_dist.cli.commands import main

    out = tmp_path / "cli"
    assert main(["viz", pruned["store"], "--finetune", "ken", "--tensor", r"mlp", "--out", str(out), "--quiet"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (out / "index.html").exists()
    assert main(["viz", pruned["store"], "--finetune", "ken", "--tensor", "nothing-matches", "--out", str(out)]) == 2
    assert "no pruned matrix" in capsys.readouterr().err
