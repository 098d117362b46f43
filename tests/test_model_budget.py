"""One keep budget per fine-tune (strategies of scope "model"): the histogram allocation of
ken_dist/kernel/strategies/budget.py, and the two-pass pipeline (scoring pass, budgets in the manifest, resume)."""
from __future__ import annotations

import io
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from cluster_helpers import assert_same_store, serial_model_reference
from tiny_models import make_finetune, make_tiny_llama

from ken_dist import select
from ken_dist.checkpoints.reads import read_rows
from ken_dist.job.plan import PruneParams, plan_finetune
from ken_dist.job.spec import FineTuneEntry, JobSpec
from ken_dist.kernel import block_scores
from ken_dist.kernel.strategies.budget import (
    BINS,
    allocate,
    bin_histogram,
    candidate_floor,
    keep_among_candidates,
    score_bins,
    score_histogram,
    total_budget,
)
from ken_dist.kernel.strategies.registry import block_top_mask
from ken_dist.store.protocol import Store


def _blocks(seed: int, n_blocks: int = 7):
    """Score blocks of varied size and scale, with ties, zeros (of both signs) and negatives."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_blocks):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 50)))
        s = rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 2)
        s[rng.random(shape) < 0.2] = 0.0
        s[rng.random(shape) < 0.05] = -0.0
        s[rng.random(shape) < 0.1] = s.flat[0]        # ties
        out[("t", i, i + 1)] = s
    return out


def test_score_bins_follow_the_order_of_the_scores():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000),
                        [0.0, -0.0, 1e-300, -1e-300, 3e38, -3e38, 1e300]])
    s.sort()
    bins = score_bins(s).astype(np.int64)
    assert np.all(np.diff(bins) >= 0)
    assert score_bins(np.array([0.0]))[0] == score_bins(np.array([-0.0]))[0]
    assert score_bins(np.array([1.0]))[0] > score_bins(np.array([0.0]))[0] > score_bins(np.array([-1.0]))[0]
    bins, counts = score_histogram(np.array([[1.0, 1.0, 2.0], [0.0, -0.0, 5.0]]))
    assert bins.dtype == np.uint16 and counts.tolist() == [2, 2, 1, 1] and np.all(np.diff(bins) > 0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.25, 0.5, 0.999, 1.0])
def test_allocation_is_the_global_top_total_up_to_the_boundary_bin(seed, frac):
    blocks = _blocks(seed)
    size = sum(s.size for s in blocks.values())
    total = int(round(frac * size))
    budgets, summary = allocate({k: score_histogram(s) for k, s in blocks.items()}, total)
    assert sum(budgets.values()) == total == summary["total"] and summary["elements"] == size
    kept = {k: block_top_mask(s, budgets[k]) for k, s in blocks.items()}
    if summary["boundary_bin"] is None:
        assert all(m.all() == (total == size) and m.any() == (total > 0) for m in kept.values())
        return
    boundary = summary["boundary_bin"]
    taken = 0
    for k, s in blocks.items():
        b = score_bins(s).reshape(s.shape)
        assert kept[k][b > boundary].all()            # everything above the boundary bin is kept
        assert not kept[k][b < boundary].any()        # nothing below it
        taken += int(kept[k][b == boundary].sum())
    assert taken == summary["from_boundary"] > 0


def test_boundary_bin_is_shared_in_proportion():
    """Two blocks with all their scores in one bin, 3:1: a budget of 8 splits 6:2."""
    hists = {("a", 0, 1): (np.array([7], np.uint16), np.array([30])),
             ("b", 0, 1): (np.array([7], np.uint16), np.array([10]))}
    assert allocate(hists, 8)[0] == {("a", 0, 1): 6, ("b", 0, 1): 2}
    assert allocate(hists, 3)[0] == {("a", 0, 1): 2, ("b", 0, 1): 1}   # 2.25 : 0.75, remainder to b
    assert allocate({}, 5) == ({}, {"total": 0, "elements": 0, "boundary_bin": None, "from_boundary": 0})
    assert BINS == 65536


@pytest.mark.parametrize("seed", range(8))
def test_a_budget_over_the_candidates_keeps_what_it_keeps_over_the_whole_block(seed):
    """candidate_floor + keep_among_candidates (what the selection pass reads of a spill) give
    block_top_mask of the whole block for every budget up to the candidates' count, ties and
    zeros of both signs included, reading only the scores of the bin the budget ends in."""
    for scores in _blocks(seed).values():
        bins, hist = score_bins(scores), score_histogram(scores)
        assert [a.tolist() for a in bin_histogram(bins)] == [a.tolist() for a in hist]
        flat = scores.reshape(-1)
        for want in sorted({0, 1, scores.size // 4, scores.size // 2, scores.size}):
            floor = candidate_floor(hist, want, cap=scores.size)
            if floor is None:
                assert want == 0
                continue
            candidates = bins >= floor[0]
            assert candidates.sum() == floor[1] >= want
            assert flat[candidates].min() >= flat[~candidates].max(initial=-np.inf)  # a prefix of the order
            groups = tuple(a[hist[0] >= floor[0]] for a in hist)
            for budget in range(floor[1] + 1):
                read = []
                flags = keep_among_candidates(bins[candidates], groups, budget,
                                              lambda at: read.append(at.size) or flat[candidates][at])
                mask = np.zeros(scores.size, bool)
                mask[np.flatnonzero(candidates)[flags]] = True
                assert np.array_equal(mask.reshape(scores.shape), block_top_mask(scores, budget)), budget
                assert sum(read) <= max(groups[1], default=0)                # one bin's scores at most


def test_candidates_stop_below_a_bin_that_passes_the_cap():
    hist = (np.array([1, 2, 3], np.uint16), np.array([5, 100, 4]))
    assert candidate_floor(hist, 4, 10) == (3, 4)
    assert candidate_floor(hist, 5, 10) == (3, 4)      # bin 2 would pass the cap of 10
    assert candidate_floor(hist, 5, 104) == (2, 104)
    assert candidate_floor(hist, 200, 1000) == (1, 109)
    assert candidate_floor(hist, 0, 10) is None and candidate_floor((hist[0], np.array([1, 1, 50])), 5, 10) is None


def test_total_budget_from_keep_or_k():
    assert total_budget([(10, 100)], 0.25, None) == 250
    assert total_budget([(4, 10), (1, 2)], None, 3) == 4 * 3 + 1 * 2


# ------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    base = make_tiny_llama(d / "base", dtype=torch.bfloat16, seed=1)
    ft = make_finetune(base, d / "ft", seed=2, model="llama", head_class=True)
    return base, ft


pytestmark = pytest.mark.usefixtures("local_ray")


def _job(pair, store, strategy="lowrank-delta-model", keep=0.25):
    return JobSpec(base=pair[0], store=str(store), block_bytes=3000, ignore_missing=(r"^lm_head\.",),
                   finetunes=(FineTuneEntry("task", pair[1], None, PruneParams(strategy=strategy, keep=keep)),))


def _independent_budgets(job):
    """Budgets recomputed here from the blocks' scores, without the driver."""
    base = job.open_base()
    spec = job.open_finetunes()[0]
    plan = plan_finetune(base, spec, block_bytes=job.block_bytes, ignore_missing=job.ignore_missing)
    units = [u for u in plan.units if u.action == "prune"]
    hists = {u.key: score_histogram(block_scores(spec.params.strategy, read_rows(u.ft_info, u.row_start, u.row_end),
                                                 read_rows(u.base_info, u.row_start, u.row_end))) for u in units}
    elements = sum(u.elements for u in units)
    return units, allocate(hists, round(spec.params.keep * elements))[0], elements


@pytest.mark.parametrize("strategy", ["lowrank-delta-model", "magnitude-model"])
def test_pipeline_spends_one_budget_and_resumes_with_it(tmp_path, pair, strategy):
    from ken_dist.runtime import run_job

    job = _job(pair, tmp_path / "store", strategy)
    log = io.StringIO()
    run_job(job, workers=2, stream=log)
    assert "scoring pass" in log.getvalue()
    blocks = re.search(r"(\d+) block\(s\) selected from their spilled candidates, (\d+) read and scored "
                       r"again", log.getvalue())
    assert blocks and int(blocks[1]) > 3 * int(blocks[2]), log.getvalue()   # one pass for most blocks
    assert not os.path.exists(_spill_dir(job.store))                          # dropped once complete
    units, budgets, elements = _independent_budgets(job)
    assert len(units) > 3
    store = Store(job.store)
    manifest = store.manifest("task")
    assert manifest["complete"] and manifest["budget"]["total"] == round(0.25 * elements) == sum(budgets.values())
    assert store.budgets("task") == budgets
    counts = [b for b in budgets.values()]
    assert len(set(counts)) > 1  # the budget moved between blocks
    # every block's stored mask is its budget's largest scores
    from ken_dist.subnetwork.view import open_subnetwork
    with open_subnetwork(job.store, "task") as sub:
        for u in units:
            ft = read_rows(u.ft_info, u.row_start, u.row_end)
            base = read_rows(u.base_info, u.row_start, u.row_end)
            got = sub.get_tensor(u.tensor).reshape(u.ft_info.row_geometry)[u.row_start:u.row_end]
            mask = select(strategy, ft, base, budget=budgets[u.key])
            assert torch.equal(got, torch.where(mask, ft, base).to(got.dtype)), u.key

    # resume: the journal went with finalize; one part goes missing: only its block runs again, with
    # the budget the manifest recorded, without a new scoring pass, and the store is as before
    assert not os.path.exists(os.path.join(job.store, "finetunes", "task", "journal.jsonl"))
    name, t = next((n, t) for n, t in manifest["tensors"].items() if t["action"] == "prune")
    lost = t["blocks"][-1]
    with open(store.resolve(lost["file"]), "rb") as f:
        lost_bytes = f.read()
    os.unlink(store.resolve(lost["file"]))
    log = io.StringIO()
    result = run_job(job, workers=2, stream=log)
    assert "scoring pass" not in log.getvalue()
    assert "0 block(s) selected from their spilled candidates, 1 read and scored again" in log.getvalue()
    assert result.blocks_run == {"task": 1} and result.blocks_reused == {
        "task": sum(len(t["blocks"]) for t in manifest["tensors"].values()) - 1}
    again_manifest = Store(job.store).manifest("task")
    assert again_manifest["complete"] and again_manifest["tensors"] == manifest["tensors"]
    with open(store.resolve(lost["file"]), "rb") as f:
        assert f.read() == lost_bytes
    again = run_job(job, workers=2, stream=io.StringIO())
    assert again.already_complete == {"task"}


def test_changed_block_plan_is_scored_again(tmp_path, pair):
    from dataclasses import replace

    from ken_dist.runtime import run_job

    job = _job(pair, tmp_path / "store")
    run_job(job, workers=2, quiet=True)
    first = Store(job.store).budgets("task")
    job2 = replace(job, block_bytes=100_000)  # one block per tensor
    log = io.StringIO()
    run_job(job2, workers=2, stream=log)
    assert "scoring pass" in log.getvalue()
    second = Store(job.store).budgets("task")
    assert set(second) != set(first) and sum(second.values()) == sum(first.values())
    assert _independent_budgets(job2)[1] == second


def test_k_gives_the_same_total_as_k_per_row(tmp_path, pair):
    """`k` with a model budget: the fine-tune keeps sum over rows of min(k, n) entries, anywhere."""
    from ken_dist.runtime import run_job

    job = JobSpec(base=pair[0], store=str(tmp_path / "store"), block_bytes=3000, ignore_missing=(r"^lm_head\.",),
                  finetunes=(FineTuneEntry("task", pair[1], None, PruneParams(strategy="magnitude-model", k=3)),))
    run_job(job, workers=2, quiet=True)
    manifest = Store(job.store).manifest("task")
    pruned = [t for t in manifest["tensors"].values() if t["action"] == "prune"]
    want = sum(t["rows"] * min(3, t["row_len"]) for t in pruned)
    assert manifest["budget"]["total"] == want == sum(t["kept"] for t in pruned)
    assert any(b["kept"] != (b["row_end"] - b["row_start"]) * min(3, t["row_len"])
               for t in pruned for b in t["blocks"])  # not k per row: the budget moved


# ------------------------------------------------------------------------------ one pass: candidate spills
def _spill_dir(store) -> str:
    return os.path.join(str(store), "finetunes", "task", "spill")


@pytest.mark.parametrize("strategy,values", [("lowrank-delta-model", "raw"), ("magnitude-model", "raw"),
                                             ("lowrank-delta-model", "int4")])
@pytest.mark.parametrize("shares", [2.0, 0.9])
def test_selection_from_the_spill_writes_the_parts_of_a_second_read(tmp_path, pair, monkeypatch, strategy, values,
                                                                     shares):
    """The same store, byte for byte (parts, budgets, manifest), whether blocks are built from the
    scoring pass's candidates or read and scored again; `shares` 0.9 keeps too few candidates for
    some blocks, which fall back, in the same job."""
    from ken_dist.job import execute

    monkeypatch.setattr(execute, "SPILL_SHARES", shares)
    monkeypatch.setattr(execute, "SPILL_MAX_SHARES", shares + 0.5)
    job = JobSpec(base=pair[0], store=str(tmp_path / "spilled"), block_bytes=3000, ignore_missing=(r"^lm_head\.",),
                  finetunes=(FineTuneEntry("task", pair[1], None,
                                           PruneParams(strategy=strategy, keep=0.25, values=values)),))
    used = serial_model_reference(job, spill=True)
    again = serial_model_reference(replace(job, store=str(tmp_path / "read-again")), spill=False)
    assert not any(again.values()) and len(used) == len(again) > 3
    if shares == 2.0:
        assert sum(used.values()) >= 0.8 * len(used)      # most blocks fit twice their share
    else:
        assert 0 < sum(used.values()) < len(used)         # both paths in one job
    assert_same_store(tmp_path / "spilled", tmp_path / "read-again", "task")
    assert not os.path.exists(_spill_dir(tmp_path / "spilled"))   # finalize dropped them


def test_a_damaged_stale_or_foreign_spill_is_never_used(tmp_path, pair):
    """Spills are checked against the block, the parameters, their size and CRC: anything else means
    reading the block again, never a wrong part."""
    from ken_dist.job.execute import _from_spill, _spill_identity, process_unit, score_unit
    from ken_dist.runtime.driver import plan_job
    from ken_dist.store.spill import open_spill

    job = _job(pair, tmp_path / "store")
    base, (plan,) = plan_job(job)
    prune = sorted((u for u in plan.units if u.action == "prune"), key=lambda u: -u.elements)
    store = Store(job.store, create=True)
    store.begin("task", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
    for u in prune[:3]:
        assert score_unit(u, store)["spilled"] > 0
    a, b, c = (replace(u, budget=1) for u in prune[:3])
    assert _from_spill(a, store) is not None
    path = store.spill_path("task", *a.key)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:])  # a flipped bit (power cut)
    assert _from_spill(a, store) is None
    open(path, "wb").write(data[:-10])                                  # torn
    assert _from_spill(a, store) is None
    open(path, "wb").write(data + b"\0")                               # longer than its header says
    assert _from_spill(a, store) is None
    open(path, "wb").write(data.replace(b'"identity"', b'"identitx"'))  # a damaged header
    assert _from_spill(a, store) is None
    os.replace(store.spill_path("task", *b.key), path)                 # another block's spill
    assert _from_spill(a, store) is None
    other = replace(c, params=replace(c.params, keep=0.5))             # scored under other parameters
    assert open_spill(store.spill_path("task", *c.key), {}, c.elements) is None and _from_spill(other, store) is None
    assert open_spill(store.spill_path("task", *c.key), _spill_identity(c), c.elements + 1) is None
    assert _from_spill(replace(c, budget=c.elements), store) is None    # budget above the candidates
    assert process_unit(a, store)["from_spill"] is False
    store.close()

    # and the stores still come out identical to a run without spills
    job2 = replace(job, store=str(tmp_path / "clean"))
    serial_model_reference(job2, spill=False)
    job3 = replace(job, store=str(tmp_path / "spilled"))
    serial_model_reference(job3, spill=True)
    assert_same_store(job2.store, job3.store, "task")


def test_no_spill_crowds_the_parts_out_of_the_disk(tmp_path, pair, monkeypatch):
    """A spill that would leave the store's file system with less than the reserve free is not
    written: the scoring pass says why, and the block is read and scored again."""
    from ken_dist.job import execute
    from ken_dist.runtime.driver import plan_job

    monkeypatch.setattr(execute, "SPILL_RESERVE_FRACTION", 1.0)
    job = _job(pair, tmp_path / "store")
    base, (plan,) = plan_job(job)
    unit = max((u for u in plan.units if u.action == "prune"), key=lambda u: u.elements)
    with Store(job.store, create=True) as store:
        store.begin("task", params=plan.spec.params.as_dict(), base_identity=base.identity(),
                    finetune_identity=plan.spec.checkpoint.identity(), tensors=plan.tensors)
        record = execute.score_unit(unit, store)
        assert "less than 100% or 1 GiB free" in record["spill_error"]
        assert not os.path.exists(store.spill_path("task", *unit.key))
        assert execute.process_unit(replace(unit, budget=1), store)["from_spill"] is False
