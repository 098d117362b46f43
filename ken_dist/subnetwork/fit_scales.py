"""`fit_scales`: fit one multiplier per row of a lossy fine-tune's stored scales on unlabeled text.

Why: a 1-bit code (`sign`, BitDelta's representation) stores each kept delta as +-s, with s the
mean |delta| of its group; that is the least-squares scale for the weights, not for what the model
computes. BitDelta recovers most of its loss by distillation: fitting the scales so that the
compressed model's outputs match the full fine-tune's on some text. Here the trainable
parameters are one multiplier a per row of every lossy tensor, applied to the row's kept deltas
(w = base + a * delta), fitted by Adam to the mean squared error between the model's outputs
(logits, or the last hidden state) and the dense fine-tune's ("the teacher") on the given texts.
No labels are needed. A row's multiplier only rescales that row's stored bfloat16 scales, so the
fitted fine-tune has the same size and format (docs/format.md), and every reader of version 2
stores loads it. docs/quality.md measures what it recovers.

The rewrite is atomic (Store.rescaling): new parts under new names, then the manifest, which
records the fit under `scale_fits`. The loss reported after the fit is that of the model as the
store now rebuilds it (scales rounded to bfloat16), not of the float multipliers.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import torch

from ken_dist.checkpoints.dtypes import torch_dtype
from ken_dist.errors import InputError, KenError, StoreError
from ken_dist.store.parts import put_kept, rescale_scales
from ken_dist.store.protocol import Store
from ken_dist.subnetwork.load_model import dtype_keyword, finetune_root, load_model, quiet_transformers
from ken_dist.subnetwork.targets import candidate_names, flat_target, model_tensors, resolve_names
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork

log = logging.getLogger(__name__)

__all__ = ["fit_scales", "texts_digest"]


def texts_digest(texts: list[str]) -> str:
    """sha256 of the calibration texts as a fit records them (`scale_fits[].texts_sha256`)."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def _lossy_tensors(sub: Subnetwork) -> list[str]:
    return [n for n, t in sub.manifest()["tensors"].items()
            if t["action"] == "prune" and any("values" in b for b in t["blocks"])]


def _teacher(student, teacher_dir: str, finetune: str, names: dict[str, str]):
    """The dense fine-tune as the student's class, its tensors checked against the student's."""
    cls = type(student)
    try:
        with quiet_transformers():
            teacher = cls.from_pretrained(teacher_dir, **{dtype_keyword(): student.dtype})
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"cannot load the teacher {teacher_dir} as {cls.__name__} ({str(exc).splitlines()[0]}); "
                         f"pass --teacher DIR, the dense fine-tune {finetune!r} was pruned from") from None
    theirs, _ = model_tensors(teacher)
    mine, _ = model_tensors(student)
    for target in names.values():
        other = theirs.get(target)
        if other is None or other.shape != mine[target].shape:
            got = "lacks it" if other is None else f"has shape {list(other.shape)}"
            raise InputError(f"teacher {teacher_dir}: tensor {target!r} has shape {list(mine[target].shape)} in "
                             f"fine-tune {finetune!r}, and the teacher {got}; pass --teacher DIR, the dense "
                             f"fine-tune this store was pruned from")
    return teacher.eval()


def _tokenizer(tokenizer, teacher_dir: str):
    if tokenizer is not None and not isinstance(tokenizer, str):
        tok = tokenizer
    else:
        from transformers import AutoTokenizer
        where = tokenizer or teacher_dir
        try:
            tok = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise InputError(f"no tokenizer loads from {where} ({str(exc).splitlines()[0]}); pass --tokenizer DIR "
                             f"(tokenizer=...) holding the fine-tune's tokenizer files") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError("the tokenizer has neither a pad token nor an EOS token to pad batches with; set "
                             "tokenizer.pad_token and pass tokenizer=")
        tok.pad_token = tok.eos_token
    return tok


def _tied_copies(model, sub: Subnetwork, names: dict[str, str], others: list[str]) -> dict[str, str]:
    """{stored name: model name} for stored tensors that are another name of a tensor the model
    holds once (tied weights stored twice, e.g. an input embedding and an LM head): they get the
    multipliers fitted for it, so that every stored copy rebuilds the same tensor."""
    tensors, canonical = model_tensors(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    fitted = {canonical.get(id(tensors[m]), m): m for m in names.values()}
    out = {}
    for s in others:
        target = next((c for c in candidate_names(s, sub.entry(s), prefix) if c in tensors), None)
        key = canonical.get(id(tensors[target]), target) if target is not None else None
        if key in fitted and sub.entry(s)["shape"] == list(tensors[target].shape):
            out[s] = fitted[key]
    return out


def _outputs(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


def _mse(student: torch.Tensor, teacher: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real tokens (padding excluded) when the outputs are per token."""
    diff = (student.float() - teacher.float()) ** 2
    if diff.dim() == 3 and attention.shape == diff.shape[:2]:
        w = attention.to(diff.dtype)[..., None]
        return (diff * w).sum() / (w.sum() * diff.shape[-1]).clamp(min=1)
    return diff.mean()


def _loss(model, teacher, enc: dict, pick: torch.Tensor, state: dict | None = None) -> torch.Tensor:
    """The output error on texts `pick`: model (with parameters `state` when given, differentiable)
    against the teacher."""
    inputs = {k: v[pick] for k, v in enc.items()}
    with torch.no_grad():
        target = _outputs(teacher(**inputs))
    with torch.set_grad_enabled(state is not None):
        out = _outputs(torch.func.functional_call(model, state, args=(), kwargs=inputs) if state else model(**inputs))
    attention = inputs.get("attention_mask")
    return _mse(out, target, attention if attention is not None else torch.ones(out.shape[:2], device=out.device))


def output_error(model, teacher, enc: dict, batch: int) -> float:
    """Mean squared output error of `model` against `teacher` over all tokenized texts `enc`."""
    n = len(next(iter(enc.values())))
    device = next(iter(enc.values())).device
    total = 0.0
    for i in range(0, n, batch):
        j = min(i + batch, n)
        total += float(_loss(model, teacher, enc, torch.arange(i, j, device=device))) * (j - i)
    return total / n


def _row_scaled(module, d: torch.Tensor, a: torch.Tensor):
    """A forward hook adding (a - 1) * (what `module` computes with weight d) to its output, so that
    the module acts as with weight p + (a - 1) * d without that weight being built: for a Linear,
    row j of the weight is output feature j; for an Embedding, row i is token i's vector."""
    if isinstance(module, torch.nn.Linear):
        def hook(mod, inputs, output):
            return output + torch.nn.functional.linear(inputs[0], d) * (a.view(-1) - 1).to(output.dtype)
    else:
        def hook(mod, inputs, output):
            ids = inputs[0]
            return output + torch.nn.functional.embedding(ids, d) * (a.view(-1)[ids] - 1).unsqueeze(-1).to(output.dtype)
    return hook


def fit_multipliers(model, teacher, enc: dict, deltas: dict[str, torch.Tensor], *, steps: int, lr: float,
                    batch: int, seed: int, say=None) -> dict[str, torch.Tensor]:
    """{parameter name: multiplier per row [rows, 1]} fitted by Adam so that `model`, its parameter
    p (holding the stored weights) replaced by p + (a - 1) * delta (delta: [rows, row_len], the
    kept deltas, zero elsewhere), matches `teacher`'s outputs on batches of the tokenized texts
    `enc` (seeded draws without replacement). The model's own parameters are not changed.

    Memory: a weight used only by Linear and Embedding modules (nearly all of a transformer's) is
    never rebuilt: a hook adds (a - 1) * (the module's output with weight delta), one more matmul
    instead of a weight-sized tensor per step and its gradient. Other tensors (norms, biases,
    convolutions) are rebuilt per step and passed by torch.func.functional_call."""
    params = dict(model.named_parameters(remove_duplicate=False))
    device = next(iter(enc.values())).device
    n = len(next(iter(enc.values())))
    alphas = {m: torch.ones(d.shape[0], 1, device=d.device, dtype=torch.float32, requires_grad=True)
              for m, d in deltas.items()}
    users: dict[int, list] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            users.setdefault(id(w), []).append(mod)
    hooked, rebuilt = [], {}
    for m, d in deltas.items():
        mods = users.get(id(params[m]), [])
        if mods and all(type(u) in (torch.nn.Linear, torch.nn.Embedding) for u in mods):
            hooked += [u.register_forward_hook(_row_scaled(u, d.view(params[m].shape), alphas[m])) for u in mods]
        else:
            rebuilt[m] = d
    opt = torch.optim.Adam(alphas.values(), lr=lr)
    rng = np.random.default_rng(seed)
    every = max(1, steps // 4)
    try:
        for step in range(1, steps + 1):
            pick = torch.from_numpy(rng.choice(n, size=min(batch, n), replace=False)).to(device)
            state = {m: (params[m].detach().view_as(d) + (alphas[m] - 1).to(d.dtype) * d).view(params[m].shape)
                     for m, d in rebuilt.items()}
            loss = _loss(model, teacher, enc, pick, state)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if say is not None and (step % every == 0 or step == steps):
                say(f"step {step}/{steps}, batch error {float(loss.detach()):.4g}")
    finally:
        for h in hooked:
            h.remove()
    return {m: a.detach() for m, a in alphas.items()}


def fit_scales(store, finetune: str, texts, *, teacher=None, tokenizer=None, base=None, steps: int = 40,
               lr: float = 0.01, batch: int = 32, max_length: int = 128, seed: int = 0, device=None,
               progress=None) -> dict:
    """Fit and store one multiplier per row of the lossy tensors of `finetune` (module docstring).

    texts: the calibration texts (a list of strings; no labels). teacher: the dense fine-tune's
    directory (default: the one recorded in the manifest). tokenizer: a tokenizer or its
    directory (default: the teacher's). base: where the base is now, if it moved. steps, lr,
    batch: Adam's; max_length: tokens per text. device: where the fit runs (default cuda when
    available). progress: a callable taking one line of text (default: logging). Returns
    {"finetune", "tensors", "rows", "parts", "texts", "loss_before", "loss_after",
    "multipliers": {min, median, max}, "seconds"}; the same, without seconds, is appended to the
    manifest's `scale_fits`. Memory: the model as stored, the teacher, and the kept deltas of the
    lossy tensors, each in the model's dtype (about 3x the model), plus one batch's activations
    (fit_multipliers never builds the fitted weights of Linear and Embedding modules).
    Holds the fine-tune's writer lock throughout."""
    t0 = time.perf_counter()
    say = progress or log.info
    texts = [t for t in texts if isinstance(t, str) and t.strip()] if not isinstance(texts, str) else []
    if not texts:
        raise InputError("fit_scales needs calibration texts: a non-empty list of strings (the CLI's --texts FILE, "
                         "one text per line)")
    for name, value, low in (("steps", steps, 1), ("batch", batch, 1), ("max_length", max_length, 1)):
        if not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr!r}")
    st = store if isinstance(store, Store) else Store(store)
    st.manifest(finetune)  # a fine-tune that exists, before its lock file is made
    with st.locked(finetune):  # no prune run may rewrite it while it is fitted
        return _fit(st, finetune, texts, teacher=teacher, tokenizer=tokenizer, base=base, steps=steps, lr=lr,
                    batch=batch, max_length=max_length, seed=seed, device=device, say=say, t0=t0)


def _fit(st: Store, finetune: str, texts: list[str], *, teacher, tokenizer, base, steps: int, lr: float, batch: int,
         max_length: int, seed: int, device, say, t0: float) -> dict:
    sub = open_subnetwork(st, finetune, base)
    lossy = _lossy_tensors(sub)
    if not lossy:
        spec = sub.manifest()["params"].get("values", "raw")
        raise InputError(f"fine-tune {finetune!r} in store {st.root} stores its kept values {spec!r} (exact copies), "
                         f"which have no scales to fit; prune it with a lossy codec (e.g. --values sign-g64) to use "
                         f"fit-scales")
    teacher_dir = str(teacher) if teacher is not None else finetune_root(sub)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    say(f"fit-scales {finetune!r}: loading the stored fine-tune and the teacher {teacher_dir}")
    student = load_model(st, finetune, base=base).eval()
    names = {s: m for s, m in resolve_names(student, sub, warn=False).items() if s in lossy}
    if not names:
        raise KenError(f"{type(student).__name__} has none of the lossy tensors of fine-tune {finetune!r}")
    ties = _tied_copies(student, sub, names, [s for s in lossy if s not in names])
    left = [s for s in lossy if s not in names and s not in ties]
    if left:
        say(f"fit-scales {finetune!r}: {len(left)} lossy tensor(s) the model does not read keep their scales: "
            + ", ".join(map(repr, left[:5])) + (" ..." if len(left) > 5 else ""))
    tok = _tokenizer(tokenizer, teacher_dir)
    teach = _teacher(student, teacher_dir, finetune, names).to(device)
    student.to(device)
    for p in list(student.parameters()) + list(teach.parameters()):
        p.requires_grad_(False)

    params, _ = model_tensors(student)
    deltas = {}
    for s, m in names.items():
        e = sub.entry(s)
        p = params[m]
        flat_target(m, p, e, s, finetune)
        b = sub.base_rows(s, 0, e["rows"]).to(device=device, dtype=p.dtype)
        deltas[m] = (p.detach().view(e["rows"], e["row_len"]) - b)
        del b
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    before = output_error(student, teach, enc, batch)
    say(f"fit-scales {finetune!r}: {len(names)} tensor(s), {sum(d.shape[0] for d in deltas.values()):,} row "
        f"multipliers, {len(texts)} text(s); output error before the fit {before:.4g}")
    fitted = fit_multipliers(student, teach, enc, deltas, steps=steps, lr=lr, batch=batch, seed=seed,
                             say=lambda msg: say(f"fit-scales {finetune!r}: {msg}"))
    mults = {m: a.clamp(min=0).cpu().double().numpy().reshape(-1) for m, a in fitted.items()}
    deltas.clear()  # free the deltas before the rewrite

    parts = 0
    todo = sum("values" in b for s in [*names, *ties] for b in sub.entry(s)["blocks"])
    say(f"fit-scales {finetune!r}: writing {todo} rescaled part(s)")
    with st.rescaling(finetune) as rw:
        for s, m in [*names.items(), *ties.items()]:
            e = sub.entry(s)
            rows = flat_target(m, params[m], e, s, finetune).view(e["rows"], e["row_len"])
            for block in e["blocks"]:
                if "values" not in block:
                    continue
                a, z = block["row_start"], block["row_end"]
                try:
                    new = rescale_scales(st.read_part(block, s), mults[m][a:z])
                except ValueError as exc:
                    raise StoreError(f"tensor {s!r} rows [{a}, {z}) of fine-tune {finetune!r}: {exc}; the fit "
                                     f"diverged: rerun with a smaller lr") from None
                rw.write(s, a, z, new)
                parts += 1
                if s in ties:  # a second stored copy of a tensor the model holds once: its parts only
                    continue
                with torch.no_grad():
                    for first, keep, values in sub.kept_in_table(s, block, new):
                        chunk = rows[first: first + keep.shape[0]]
                        put_kept(chunk, keep, values, torch_dtype(e["dtype"]))
                        if not torch.isfinite(chunk).all():
                            raise StoreError(f"tensor {s!r} rows [{a}, {z}) of fine-tune {finetune!r}: a rescaled "
                                             f"value overflows {e['dtype']}; the fit diverged: rerun with a smaller lr")
        after = output_error(student, teach, enc, batch)
        all_m = np.concatenate(list(mults.values()))
        record = {"teacher": teacher_dir, "texts": len(texts),
                  "texts_sha256": texts_digest(texts),
                  "steps": steps, "lr": lr, "batch": batch, "max_length": max_length, "seed": seed,
                  "tensors": len(names), "rows": int(all_m.size), "parts": parts,
                  "loss_before": before, "loss_after": after,
                  "multipliers": {"min": float(all_m.min()), "median": float(np.median(all_m)),
                                  "max": float(all_m.max())}}
        rw.commit(record)
    seconds = time.perf_counter() - t0
    say(f"fit-scales {finetune!r}: output error {before:.4g} -> {after:.4g} (as stored); rewrote {parts} part(s) "
        f"in {seconds:.1f} s")
    return {"finetune": finetune, **record, "seconds": seconds}
