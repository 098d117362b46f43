"""`load_model`: a transformers model of a stored fine-tune, built from the base checkpoint.

Why not materialize and from_pretrained: that writes (and reads) a second dense copy. Here
transformers loads the *base* weights with the *fine-tune's* config (so the fine-tune's class
and any new head exist; heads the base lacks start random), then inject.apply writes the kept
entries and the whole-stored tensors in place. Peak memory is one dense model plus one row
block, and device_map / meta-device loading work wherever transformers supports them, because
ken_dist only ever writes into parameters transformers has placed.

Nothing random survives silently: every parameter transformers could not fill from the base
(its `missing_keys`) must be written from the store, or load_model raises a KenError naming it.
"""
from __future__ import annotations

import contextlib
import logging
import os

from ken_dist.checkpoints.inventory import open_checkpoint
from ken_dist.errors import KenError
from ken_dist.subnetwork.inject import apply, resolve_names
from ken_dist.subnetwork.view import Subnetwork, open_subnetwork

log = logging.getLogger(__name__)

__all__ = ["load_model", "finetune_root", "dtype_keyword"]


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars or load report: the report lists the new head as 'newly
    initialized'; it is not, once apply() has run, and load_model's own check replaces it."""
    from transformers.utils import logging as tlog
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def dtype_keyword() -> str:
    """from_pretrained's name for the dtype argument: `dtype` from transformers 5, `torch_dtype` before."""
    import transformers
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def finetune_root(sub: Subnetwork, override=None) -> str:
    """The fine-tune's directory (config.json, tokenizer files): `override`, else the manifest's
    root, else its HF repo id resolved offline from the local cache."""
    if override is not None:
        return os.fspath(override)
    ident = sub.manifest().get("finetune_identity") or {}
    root, source = ident.get("root"), ident.get("source")
    if root and os.path.isfile(os.path.join(root, "config.json")):
        return root
    cache = ""
    if source and not os.path.exists(source):
        try:
            return open_checkpoint(source, None if "@" in source else ident.get("revision")).root
        except KenError as exc:
            cache = f" (nor in the Hugging Face cache as {source!r}: {str(exc).split(';')[0]})"
    raise KenError(f"the config.json of fine-tune {sub.finetune!r} is not at {root}{cache} (recorded in its "
                   f"manifest in store {sub.store.root}); pass finetune_root=DIR holding the fine-tune's config.json, or "
                   f"config=<a transformers PretrainedConfig>")


def _model_class(config, sub: Subnetwork):
    import transformers
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if archs:
        raise KenError(f"fine-tune {sub.finetune!r}: transformers {transformers.__version__} has no class "
                       f"{archs[0]!r} (config.json architectures); pass model_class=... (e.g. "
                       f"AutoModelForCausalLM, or the custom class)")
    return transformers.AutoModel


def _weights_path(sub: Subnetwork) -> str:
    """What from_pretrained should read: the base directory, or its single file when that file
    is not the directory's model.safetensors (from_pretrained then reads exactly that file)."""
    ckpt = sub.base_checkpoint
    if len(ckpt.files) == 1:
        f = ckpt.files[0]
        return ckpt.root if os.path.basename(f) == "model.safetensors" else f
    if not os.path.isfile(os.path.join(ckpt.root, "model.safetensors.index.json")):
        raise KenError(f"base checkpoint {ckpt.root} is sharded without model.safetensors.index.json, which "
                       f"transformers needs; rename its index to that, or materialize() the fine-tune")
    return ckpt.root


def load_model(store, finetune: str, model_class=None, device_map=None, *, base=None, config=None,
               finetune_root_dir=None, strict: bool = False, allow_random_init: bool = False,
               verify: bool = True, name_map=None, **from_pretrained_kwargs):
    """The pruned fine-tune as a transformers model, loaded from the base and the store.

    model_class: None picks the class named in the fine-tune's config.json `architectures`
    (the fine-tune root is recorded in the manifest); any transformers class or Auto class
    works. base: where the base is now (directory, .safetensors file, HF repo id[@revision]
    in the local cache), if it moved. strict: stored tensors the model class lacks raise
    instead of warning. allow_random_init: accept parameters neither the base nor the store
    holds (they keep transformers' random init). Other keyword arguments (dtype,
    attn_implementation, max_memory, ...) go to from_pretrained. The returned model records
    the fine-tune it holds (`model.ken_subnetwork`) for swap()."""
    sub = open_subnetwork(store, finetune, base, verify=verify)
    if config is None:
        from transformers import AutoConfig
        root = finetune_root(sub, finetune_root_dir)
        trust = from_pretrained_kwargs.get("trust_remote_code")
        config = AutoConfig.from_pretrained(root, **({"trust_remote_code": trust} if trust is not None else {}))
    cls = model_class or _model_class(config, sub)
    kwargs = dict(from_pretrained_kwargs)
    kwargs.pop("output_loading_info", None)
    if "dtype" not in kwargs and "torch_dtype" not in kwargs and dtype_keyword() == "torch_dtype":
        kwargs["torch_dtype"] = "auto"  # v5's default; v4 would load float32
    if device_map is not None:
        kwargs["device_map"] = device_map
    path = _weights_path(sub)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except (ImportError, ValueError) as e:
        if device_map is not None and "accelerate" in str(e):
            raise KenError(f"device_map={device_map!r} needs the accelerate package: pip install accelerate "
                           f"({e})") from None
        raise
    names = resolve_names(model, sub, name_map=name_map, strict=strict)
    unfilled = set(info.get("missing_keys") or ()) | {k if isinstance(k, str) else k[0]
                                                      for k in info.get("mismatched_keys") or ()}
    written = set(names.values())
    random_left = sorted(k for k in unfilled if k not in written)
    if random_left and not allow_random_init:
        raise KenError(f"{cls.__name__} parameters {random_left[:8]} are neither in the base checkpoint "
                       f"{sub.base_checkpoint.root} nor in fine-tune {finetune!r}: they would keep random initial "
                       f"values; load the class the fine-tune was saved with (model_class=...), or pass "
                       f"allow_random_init=True to accept them")
    apply(model, sub, finetune, names=names,
          fill_from_base=[t for s, t in names.items() if t in unfilled and sub.entry(s)["action"] == "prune"])
    _fine_tune_generation_config(model, sub, finetune_root_dir)
    return model


def _fine_tune_generation_config(model, sub: Subnetwork, override) -> None:
    """from_pretrained read the base's generation_config.json; the fine-tune's (if any) wins."""
    if not getattr(model, "can_generate", lambda: False)():
        return
    try:
        root = finetune_root(sub, override)
    except KenError as exc:
        log.warning("fine-tune %r keeps the base's generation config: its own directory is not found (%s)",
                    sub.finetune, exc)
        return
    if os.path.isfile(os.path.join(root, "generation_config.json")):
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(root)
