"""Tiny real checkpoints for tests, built with transformers and saved as safetensors.

Shared by every test module (checkpoint, store, loader, runtime, cli): like mergekit's
`make_picollama`, the models are real architectures (so names, shapes and sharded layouts
are those of real checkpoints) but tiny, so each build takes well under a second after the
one-time transformers import. Nothing is downloaded: configs are built in code, no tokenizer.

    make_tiny_llama(dir, dtype=torch.float32, seed=0, shard_bytes=None) -> str
        LlamaForCausalLM: names model.* + lm_head.weight (untied).
    make_tiny_bert(dir, dtype=torch.float32, seed=0, shard_bytes=None) -> str
        BertModel: names embeddings.*, encoder.*, pooler.* (no prefix).
    make_finetune(base_dir, out_dir, seed, scale=0.01, add_head=True, model="llama", ...) -> str
        Perturbed copy of a base with the SAME tensor names (+ a new head if add_head), so
        match_checkpoints(base, ft) passes with default options.
        head_class=True instead saves a real XForSequenceClassification built from the base:
        llama -> model.* + score.weight, lm_head.weight absent (a "missing" case);
        bert  -> bert.* + classifier.* (a prefix case: --map-prefix 'bert.=').
    save_tiny_tokenizer(dir) -> list[str]
        A WordPiece (BertTokenizer) vocabulary of 121 words within the tiny models' 128 ids,
        saved into dir; returns the words, for texts it tokenizes without [UNK].
    make_hf_cache(cache_dir, repo_id, src_dir, commit=None, ref="main") -> str
        Lays src_dir out as the HF hub cache does (blobs + snapshots/<commit> symlinks +
        refs/<ref>) and returns the snapshot path; resolve with HF_HUB_CACHE=cache_dir.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from ken_dist.subnetwork.load_model import quiet_transformers

LLAMA = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=128,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             tie_word_embeddings=False, pad_token_id=0)
BERT = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=128,
            num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2)


def _save(model, out_dir, dtype, shard_bytes) -> str:
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model = model.to(dtype)
    with quiet_transformers():
        model.save_pretrained(out_dir, max_shard_size=shard_bytes or "50GB")
    return out_dir


def _build(cls, config, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def make_tiny_llama(dir, dtype=torch.float32, seed=0, shard_bytes=None) -> str:
    """A 2-layer Llama (hidden 32, heads 4, kv heads 2, vocab 128) saved as safetensors;
    shard_bytes (int) splits it into shards + model.safetensors.index.json."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return _save(_build(LlamaForCausalLM, LlamaConfig(**LLAMA), seed), dir, dtype, shard_bytes)


def make_tiny_bert(dir, dtype=torch.float32, seed=0, shard_bytes=None) -> str:
    """A 2-layer BertModel (hidden 32, heads 4, vocab 128) saved as safetensors."""
    from transformers import BertConfig, BertModel
    return _save(_build(BertModel, BertConfig(**BERT), seed), dir, dtype, shard_bytes)


def _perturb(t: torch.Tensor, gen: torch.Generator, scale: float, big_frac: float,
             big_scale: float) -> torch.Tensor:
    """base + N(0, scale) everywhere + N(0, big_scale*scale) on a random big_frac of entries,
    so there are a few large deltas for KEN to find, as after real fine-tuning."""
    if not t.is_floating_point() or t.numel() == 0:
        return t.clone()
    x = t.float()
    noise = torch.randn(x.shape, generator=gen) * scale
    big = torch.rand(x.shape, generator=gen) < big_frac
    noise = noise + big * torch.randn(x.shape, generator=gen) * (scale * big_scale)
    return (x + noise).to(t.dtype)


def _load_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def make_finetune(base_dir, out_dir, seed, scale=0.01, add_head=True, model="llama", *,
                  shard_bytes=None, num_labels=2, head_class=False, big_frac=0.05,
                  big_scale=10.0) -> str:
    """A fine-tune of base_dir: every float tensor perturbed (seeded), dtype kept, config
    copied; with add_head a new classification head (score.weight for llama, classifier.*
    for bert). See the module docstring for head_class=True."""
    base_dir, out_dir = os.fspath(base_dir), os.fspath(out_dir)
    if model not in ("llama", "bert"):
        raise ValueError(f"model must be 'llama' or 'bert', not {model!r}")
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    if head_class:
        return _finetune_head_class(base_dir, out_dir, gen, model, scale, big_frac, big_scale,
                                    shard_bytes, num_labels)
    state = {k: _perturb(v, gen, scale, big_frac, big_scale)
             for k, v in _load_dir(base_dir).items()}
    dtype = next(iter(state.values())).dtype
    hidden = config["hidden_size"]
    if add_head:
        head = "score" if model == "llama" else "classifier"
        state[f"{head}.weight"] = (torch.randn(num_labels, hidden, generator=gen) * 0.02).to(dtype)
        if model == "bert":
            state["classifier.bias"] = torch.zeros(num_labels, dtype=dtype)
        config["architectures"] = ["LlamaForSequenceClassification" if model == "llama"
                                   else "BertForSequenceClassification"]
        config["num_labels"] = num_labels
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    from huggingface_hub import save_torch_state_dict
    save_torch_state_dict(state, out_dir, max_shard_size=shard_bytes or "50GB",
                          metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def _finetune_head_class(base_dir, out_dir, gen, model, scale, big_frac, big_scale,
                         shard_bytes, num_labels) -> str:
    import transformers
    cls = getattr(transformers, "LlamaForSequenceClassification" if model == "llama"
                  else "BertForSequenceClassification")
    dtype = next(iter(_load_dir(base_dir).values())).dtype
    with quiet_transformers():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            m = cls.from_pretrained(base_dir, num_labels=num_labels, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(_perturb(p.data, gen, scale, big_frac, big_scale))
    return _save(m, out_dir, dtype, shard_bytes)


def save_tiny_tokenizer(dir) -> list[str]:
    """A BertTokenizer over a fixed 126-entry vocabulary (ids < 128), saved into dir."""
    from transformers import BertTokenizer

    words = [chr(c) for c in range(97, 123)] + [f"w{i}" for i in range(95)]
    vocab = os.path.join(os.fspath(dir), "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(vocab).save_pretrained(os.fspath(dir))
    return words


def make_hf_cache(cache_dir, repo_id: str, src_dir, commit: str | None = None,
                  ref: str | None = "main") -> str:
    """Copy src_dir into an HF hub cache layout; return snapshots/<commit> (40 hex chars)."""
    cache_dir, src_dir = os.fspath(cache_dir), os.fspath(src_dir)
    commit = commit or hashlib.sha1(f"{repo_id}:{src_dir}".encode()).hexdigest()
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        with open(src, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        blob = os.path.join(repo, "blobs", digest)
        if not os.path.exists(blob):
            shutil.copyfile(src, blob)
        link = os.path.join(snap, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(blob, snap), link)
    if ref:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snap
