"""Fuzz what a user types: job YAML files, CLI arguments, and the journal a killed run leaves.

Oracle: a clean refusal (InputError naming the job file and field from load_job_file;
`ken-dist: error: ...` or argparse's usage message from the CLI, exit 2, no traceback), or a
run that does what the accepted job says: a job equal to the fixture's prunes exactly the
fixture's store, and nothing is written outside the store the job names. Prune runs in this
process with the Ray dispatch replaced by the same work units run serially (conftest.serial_units).
"""
from __future__ import annotations

import json
import os
import random
from fractions import Fraction

import yaml
from conftest import REAL_BLOCK_BYTES, REAL_KEEP, real_argv, serial_units
from harness import (
    assert_cli_error,
    assert_ken_error,
    assert_writes_only_under,
    fuzz_settings,
    library_call,
    run_cli,
    same_bits,
    snapshot,
    workspace,
)
from hypothesis import given
from hypothesis import strategies as st
from mutations import HOSTILE_STRINGS, dumps, json_mutation

from ken_dist.errors import InputError
from ken_dist.job.spec import load_job_file, parse_bytes

DEPTH = ("w",) * 4  # the case's working directory: relative paths, even with '..', stay in the case


def _store_tensors(store: str) -> dict:
    from ken_dist.subnetwork.view import open_subnetwork

    with open_subnetwork(store, "sft") as sub:
        return {n: sub.get_tensor(n) for n in sub.keys()}


def _assert_real_store(fixtures, store: str, desc: str) -> None:
    got, want = _store_tensors(store), fixtures["real_expected"]
    assert sorted(got) == sorted(want), desc
    for name in want:
        assert same_bits(got[name], want[name]), f"{desc}: tensor {name!r} differs from a clean run"


def _inside(path: str, root: str) -> str | None:
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    return None if rel.startswith("..") else rel


# ---- job files ----------------------------------------------------------------------------------

BYTE_TEXTS = ["1.2.3MiB", "1.5", "1.5KiB", "64MiB", "0", "-1", "1e3", "0.5B", "1.0000001KB", " 256 ", "256b", "2 KiB",
              "9" * 30, "1TiB", "1.25kb", "0x100", "", "MiB", "1_000"]


@st.composite
def job_mutation(draw, doc: dict):
    """(description, YAML bytes, same job?) for the fixture's job document."""
    kind = draw(st.sampled_from(["doc", "doc", "doc", "block_bytes", "dup-finetune", "text"]))
    if kind == "block_bytes":
        text = draw(st.sampled_from(BYTE_TEXTS))
        new = dict(doc, block_bytes=text)
        return f"block_bytes {text!r}", yaml.safe_dump(new).encode(), False
    if kind == "dup-finetune":
        new = dict(doc, finetunes=doc["finetunes"] * 2)
        return "the fine-tune listed twice", yaml.safe_dump(new).encode(), False
    if kind == "text":
        raw = yaml.safe_dump(doc).encode()
        at = draw(st.integers(0, len(raw)))
        damage = draw(st.sampled_from([b"", b"\t", b"\xff\xfe", b": :", b"\n  - [", b"&a *a", b"!!python/object:os.system"]))
        return f"{damage!r} at byte {at}, rest cut" if damage == b"" else f"{damage!r} inserted at byte {at}", \
            raw[:at] + damage + (raw[at:] if damage else b""), False
    desc, new, harmless = draw(json_mutation(doc))
    return desc, (yaml.safe_dump(new) if harmless else dumps(new)).encode(), harmless


def _job_doc(case: str) -> dict:
    return {"base": os.path.join(case, "base"), "store": os.path.join(case, "store"), "keep": REAL_KEEP,
            "block_bytes": REAL_BLOCK_BYTES, "finetunes": [{"name": "sft", "source": os.path.join(case, "finetune")}]}


@given(data=st.data())
@fuzz_settings(400)
def test_mutated_job_file_is_refused_or_runs_that_job(fixtures, data, monkeypatch):
    from ken_dist.runtime import driver

    monkeypatch.setattr(driver, "_run_units", serial_units)
    with workspace(fixtures["cases"], base=fixtures["real_base"], finetune=fixtures["real_ft"]) as case:
        desc, text, harmless = data.draw(job_mutation(_job_doc(case)), label="mutation")
        cwd = os.path.join(case, *DEPTH)
        os.makedirs(cwd)
        monkeypatch.chdir(cwd)
        job_file = os.path.join(case, "job.yaml")
        with open(job_file, "wb") as f:
            f.write(text)
        spec, exc = library_call(load_job_file, job_file)
        if exc is not None:
            assert not harmless, f"{desc}: a harmless mutation was refused: {exc}"
            assert_ken_error(exc, (InputError,), job_file)
            rc, _, err = run_cli(["prune", "--job", job_file, "--quiet"])
            assert_cli_error(rc, err, job_file)
            return
        for ft in spec.finetunes:  # what was accepted is well-typed
            assert isinstance(ft.name, str) and ft.name and isinstance(ft.source, str), desc
        assert isinstance(spec.block_bytes, int) and spec.block_bytes > 0, desc
        store_rel = _inside(spec.store, fixtures["root"])
        if store_rel is None or not store_rel.startswith(os.path.relpath(case, fixtures["root"]) + os.sep):
            # a cut path ('/', '/tmp/pyt'): run it only where it must be refused (an existing
            # non-store); a new directory elsewhere on this machine is the user's choice, not ours
            if os.path.exists(spec.store) and not os.path.exists(os.path.join(spec.store, "ken_store.json")):
                rc, _, err = run_cli(["prune", "--job", job_file, "--quiet"])
                assert_cli_error(rc, err, os.path.basename(spec.store.rstrip("/")))
            return
        before = snapshot(fixtures["root"])
        rc, _, err = run_cli(["prune", "--job", job_file, "--quiet"])
        assert_writes_only_under(before, snapshot(fixtures["root"]), [store_rel])
        assert "Traceback" not in err, f"{desc}:\n{err}"
        if rc != 0:
            assert not harmless, f"{desc}: a harmless mutation was refused:\n{err}"
            assert_cli_error(rc, err)
            return
        clean = load_job_file_of(_job_doc(case), case)
        if (spec.base, spec.store, spec.finetunes, spec.block_bytes) == \
                (clean.base, clean.store, clean.finetunes, clean.block_bytes):
            _assert_real_store(fixtures, spec.store, desc)


def load_job_file_of(doc: dict, case: str):
    path = os.path.join(case, "clean.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return load_job_file(path)


def _exact_bytes(text: str) -> int | None:
    """An independent reading of a size: digits[.digits] then an optional unit (k/m/g/t, with i
    for binary, optional b; or b alone), around optional spaces; None when not a whole positive
    number of bytes."""
    s = text.strip()
    units = {"": 1, "b": 1}
    for i, u in enumerate("kmgt", 1):
        for suffix in (u, u + "b"):
            units[suffix] = 1000**i
        for suffix in (u + "i", u + "ib"):
            units[suffix] = 1024**i
    number = s.rstrip("kKmMgGtTiIbB ")
    unit = s[len(number):].strip().lower()
    number = number.strip()
    if unit not in units or not number or not all(c.isdigit() or c == "." for c in number) or \
            number.count(".") > 1 or number.startswith(".") or number.endswith("."):
        return None
    if s[len(number):].strip() != s[len(number):].lstrip() or " " in s[len(number):].strip():
        return None
    if "." in number and unit == "":
        return None
    value = Fraction(number) * units[unit]
    return int(value) if value.denominator == 1 and value > 0 else None


@given(text=st.one_of(st.sampled_from(BYTE_TEXTS),
                      st.builds(lambda n, d, sp, u: f"{n}{d}{sp}{u}", st.integers(0, 10**6).map(str),
                                st.sampled_from(["", ".5", ".25", ".125", ".1", ".0", ".", ".3"]),
                                st.sampled_from(["", " "]),
                                st.sampled_from(["", "b", "B", "k", "KB", "KiB", "kib", "MiB", "mb", "G", "GiB",
                                                 "TiB", "iB", "x", "MiBs"])),
                      st.text(alphabet="0123456789.kKMiBb -", max_size=8)))
@fuzz_settings(500)
def test_byte_sizes_parse_exactly_or_are_refused(text):
    want = _exact_bytes(text)
    got, exc = library_call(parse_bytes, text)
    if want is None:
        assert exc is not None, f"{text!r} was read as {got} bytes"
        assert_ken_error(exc, (InputError,), repr(text))
    else:
        assert exc is None and got == want, f"{text!r}: {got} / {exc}, expected {want}"


# ---- CLI arguments ------------------------------------------------------------------------------------

ARG_VALUES = st.one_of(st.sampled_from(HOSTILE_STRINGS + BYTE_TEXTS + ["0", "-3", "1", "0.25", "2", "1.5", "nan",
                                                                       "inf", "ken", "magnitude", "[", "(?P<"]),
                       st.text(max_size=6))


@st.composite
def cli_args(draw, case: str, fixtures):
    store, out = os.path.join(case, "store"), os.path.join(case, "out")
    base, ft = os.path.join(case, "base"), os.path.join(case, "finetune")
    verb = draw(st.sampled_from(["prune", "prune", "inspect", "materialize", "viz"]))
    if verb == "prune":
        argv = real_argv(base, ft, os.path.join(case, "new-store"))
        options = ["--k", "--keep", "--name", "--strategy", "--compat", "--seed", "--include", "--exclude",
                   "--preset", "--map-prefix", "--block-bytes", "--workers", "--placement", "--revision"]
    elif verb == "inspect":
        argv = ["inspect", store]
        options = ["--finetune", "--tensor"]
    elif verb == "materialize":
        argv = ["materialize", store, "--finetune", "sft", "--out", out]
        options = ["--finetune", "--shard-bytes", "--base", "--out"]
    else:
        argv = ["viz", store, "--finetune", "sft", "--out", out, "--no-single", "--no-layers"]
        options = ["--finetune", "--tensor", "--max-pixels", "--base"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "drop", "positional", "flag"]))
        if op == "set":
            argv += [draw(st.sampled_from(options)), draw(ARG_VALUES)]
        elif op == "drop" and len(argv) > 2:
            i = draw(st.integers(1, len(argv) - 1))
            argv = argv[:i] + argv[i + 1:]
        elif op == "positional":
            argv.insert(draw(st.integers(1, len(argv))), draw(ARG_VALUES))
        else:
            argv.append(draw(st.sampled_from(["--overwrite", "--json", "--quiet", "--delta", "--bogus", "-"])))
    return argv


@given(data=st.data())
@fuzz_settings(400)
def test_mutated_cli_arguments_are_refused_or_run(fixtures, data, monkeypatch):
    from ken_dist.runtime import driver

    monkeypatch.setattr(driver, "_run_units", serial_units)
    with workspace(fixtures["cases"], base=fixtures["real_base"], finetune=fixtures["real_ft"],
                   store=fixtures["real_store"]) as case:
        argv = data.draw(cli_args(case, fixtures), label="argv")
        cwd = os.path.join(case, *DEPTH)
        os.makedirs(cwd)
        monkeypatch.chdir(cwd)
        before = snapshot(fixtures["root"])
        rc, out, err = run_cli(argv)
        after = snapshot(fixtures["root"])
        assert "Traceback" not in err, f"{argv}:\n{err}"
        assert rc in (0, 2), f"{argv}: exit {rc}\n{err}"
        if rc == 2:
            assert_cli_error(rc, err)
        # writes only inside the case (a relative --out or --store is the case's business)
        assert_writes_only_under(before, after, [os.path.relpath(case, fixtures["root"])])
        assert not [p for p in after if p.endswith(".tmp") and p not in before and "/." not in p], \
            f"{argv}: temporary files left: {[p for p in after if p.endswith('.tmp')]}"


# ---- the journal a killed run leaves ------------------------------------------------------------------

@st.composite
def journal_mutation(draw, lines: list[bytes], planned: list[tuple], files: list[str]):
    """Torn lines, duplicates, drops, garbage, records for unplanned blocks or pointing at another
    part, retyped fields, reordering."""
    kind = draw(st.sampled_from(["torn", "dup", "drop", "garbage", "unplanned", "retarget", "retype", "shuffle"]))
    lines = list(lines)
    i = draw(st.integers(0, len(lines) - 1))
    rec = json.loads(lines[i])
    if kind == "torn":
        raw = b"".join(lines)
        at = draw(st.integers(0, len(raw)))
        return f"journal cut at byte {at}", raw[:at]
    if kind == "dup":
        lines.insert(draw(st.integers(0, len(lines))), lines[i])
        desc = f"line {i} repeated"
    elif kind == "drop":
        del lines[i]
        desc = f"line {i} dropped"
    elif kind == "garbage":
        lines.insert(i, draw(st.sampled_from([b"\n", b"{\n", b"\xff\xfe\n", b"[]\n", b"null\n", b'{"tensor": 1}\n'])))
        desc = f"garbage before line {i}"
    elif kind == "unplanned":
        which = draw(st.sampled_from(["tensor", "rows"]))
        if which == "tensor":
            rec["tensor"] = draw(st.sampled_from(["nope", rec["tensor"] + "x", ""]))
        else:
            rec["row_end"] = rec["row_end"] + draw(st.sampled_from([1, -1, 100]))
        lines.append((json.dumps(rec) + "\n").encode())
        desc = f"a record for an unplanned block ({which})"
    elif kind == "retarget":
        rec["file"] = draw(st.sampled_from(files + HOSTILE_STRINGS))
        lines.append((json.dumps(rec) + "\n").encode())
        desc = f"line {i}'s block pointed at {rec['file']!r}"
    elif kind == "retype":
        d, new, _ = draw(json_mutation(rec))
        lines.append((dumps(new) + "\n").encode())
        desc = f"line {i} appended with {d}"
    else:
        random.Random(draw(st.integers(0, 2**32))).shuffle(lines)
        desc = "lines shuffled"
    return desc, b"".join(lines)


@given(data=st.data())
@fuzz_settings(200)
def test_resume_from_a_mutated_journal_gives_the_clean_store(fixtures, data, monkeypatch):
    from ken_dist.runtime import driver

    monkeypatch.setattr(driver, "_run_units", serial_units)
    journal = os.path.join(fixtures["real_pending"], "finetunes", "sft", "journal.jsonl")
    with open(journal, "rb") as f:
        lines = f.readlines()
    recs = [json.loads(line) for line in lines]
    desc, text = data.draw(journal_mutation(lines, [(r["tensor"], r["row_start"], r["row_end"]) for r in recs],
                                            sorted({r["file"] for r in recs})), label="mutation")
    with workspace(fixtures["cases"], base=fixtures["real_base"], finetune=fixtures["real_ft"],
                   store=fixtures["real_pending"]) as case:
        store = os.path.join(case, "store")
        with open(os.path.join(store, "finetunes", "sft", "journal.jsonl"), "wb") as f:
            f.write(text)
        rc, out, err = run_cli(["inspect", store])
        assert rc == 0 and "INCOMPLETE" in out, f"{desc}: inspect of the unfinished store:\n{err}"
        before = snapshot(fixtures["root"])
        rc, out, err = run_cli(real_argv(os.path.join(case, "base"), os.path.join(case, "finetune"), store))
        assert_writes_only_under(before, snapshot(fixtures["root"]), [os.path.relpath(store, fixtures["root"])])
        assert rc == 0, f"{desc}: the resume failed:\n{err}"
        _assert_real_store(fixtures, store, desc)
