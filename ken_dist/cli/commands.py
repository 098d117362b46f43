"""The `ken-dist` command: one function per verb that parses, validates and calls the library."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from ken_dist.cli.summary import human_bytes, print_summary, ratio_text
from ken_dist.errors import InputError, KenError

EPILOG = """examples:
  ken-dist demo
  ken-dist prune ./llama-base ./llama-sft --store ./subnets --keep 0.25
  ken-dist prune meta-llama/Llama-3.1-8B ./sft-a ./sft-b --name a --name b --store s3dir --k 1024
  ken-dist prune --job jobs/example_job.yaml
  ken-dist submit jobs/example_job.yaml --address http://HEAD:8265 --wait
  ken-dist inspect ./subnets
  ken-dist materialize ./subnets --finetune llama-sft --out ./llama-sft-pruned
  ken-dist fit-scales ./subnets --finetune llama-sft --texts calib.txt
  ken-dist viz ./subnets --finetune llama-sft --tensor 'layers[.]0[.]' --out ./viz

Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to keep a private local Ray on 127.0.0.1."""


def byte_size(text: str) -> int:
    """argparse type for sizes: ken_dist.job.spec.parse_bytes, its message as argparse's."""
    from ken_dist.job.spec import parse_bytes

    try:
        return parse_bytes(text)
    except KenError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def stderr_progress(quiet: bool):
    """The progress callback of a verb: each line to stderr as it comes, or none with --quiet."""
    return None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def parse_prefix(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--map-prefix takes FINETUNE_PREFIX=BASE_PREFIX, got {text!r} "
                                         "(e.g. 'bert.=' strips 'bert.' from fine-tune names)")
    ft, base = text.split("=", 1)
    return ft, base


def _job_from_args(args):
    from ken_dist.job.plan import PruneParams
    from ken_dist.job.spec import FineTuneEntry, JobSpec, default_name, load_job_file

    if args.job:
        if args.base or args.finetunes:
            raise KenError("give either --job FILE or BASE FINETUNE..., not both")
        return load_job_file(args.job)
    if not args.base or not args.finetunes:
        raise KenError("prune needs BASE and at least one FINETUNE (or --job FILE); see ken-dist prune --help")
    if not args.store:
        raise KenError("prune needs --store DIR: where the subnetwork dataset is written")
    if args.k is None and args.keep is None:
        raise KenError("give --k N (entries kept per row) or --keep F (fraction kept per row, e.g. 0.25)")
    names = args.name or []
    if names and len(names) != len(args.finetunes):
        raise KenError(f"--name given {len(names)} time(s) for {len(args.finetunes)} fine-tune(s): "
                       "give one --name per FINETUNE, in the same order, or none")
    params = PruneParams(strategy=args.strategy, k=args.k, keep=args.keep, compat=args.compat, seed=args.seed,
                         values=args.values)
    entries = tuple(FineTuneEntry(names[i] if names else default_name(src), src, None, params)
                    for i, src in enumerate(args.finetunes))
    return JobSpec(base=args.base, finetunes=entries, store=args.store, base_revision=args.revision,
                   include=tuple(args.include) if args.include else None,
                   exclude=tuple(args.exclude) if args.exclude else None, preset=args.preset,
                   prefix_map=dict(args.map_prefix) if args.map_prefix else None,
                   ignore_missing=tuple(args.ignore_missing) if args.ignore_missing else None,
                   block_bytes=args.block_bytes, address=args.address, workers=args.workers)


def cmd_prune(args) -> int:
    from ken_dist.runtime import run_job

    job = _job_from_args(args)
    for ft in job.finetunes:  # before hours of pruning, not after
        if ft.fit_texts and not os.path.isfile(ft.fit_texts):
            raise InputError(f"fine-tune {ft.name!r}: `fit_texts` {ft.fit_texts!r} is not a file here; give the "
                             f"calibration texts, one per line (relative paths are relative to the directory "
                             f"ken-dist runs in)")
    t0 = time.time()
    result = run_job(job, address=args.address or job.address, workers=args.workers or job.workers,
                     overwrite=args.overwrite, quiet=args.quiet, placement=args.placement)
    for name in result:
        if name in result.already_complete:
            print(f"fine-tune {name!r}: already complete in the store, nothing to do")
        else:
            print(f"fine-tune {name!r}: ran {result.blocks_run[name]} block(s), "
                  f"reused {result.blocks_reused[name]} block(s) from an earlier run")
    print_summary(job.store, [ft.name for ft in job.finetunes], time.time() - t0)
    for ft in job.finetunes:
        if ft.fit_texts:
            _fit_after_prune(job.store, ft.name, ft.fit_texts, args.quiet)
    return 0


def _fit_after_prune(store: str, finetune: str, path: str, quiet: bool) -> None:
    """A job's `fit_texts`: fit-scales with its defaults, unless the last fit used the same texts."""
    from ken_dist.store.protocol import Store
    from ken_dist.subnetwork.fit_scales import fit_scales, texts_digest

    texts = read_texts(path, FIT_CALIB, 0)
    fits = Store(store).manifest(finetune).get("scale_fits") or []
    if fits and fits[-1].get("texts_sha256") == texts_digest(texts):
        print(f"fine-tune {finetune!r}: scales already fitted on {path}, nothing to do")
        return
    result = fit_scales(store, finetune, texts,
                        progress=stderr_progress(quiet))
    _print_fit(finetune, result)


def cmd_materialize(args) -> int:
    from ken_dist.subnetwork.materialize import materialize

    t0 = time.time()
    info = materialize(args.store, args.finetune, args.out, base=args.base, overwrite=args.overwrite,
                       max_shard_bytes=args.shard_bytes)
    print(f"wrote {args.out}: {len(info['shards'])} safetensors file(s) in {time.time() - t0:.1f} s; "
          f"load it with transformers' from_pretrained({args.out!r})")
    return 0


def cmd_inspect(args) -> int:
    from ken_dist.subnetwork.inspect import inspect_store

    report = inspect_store(args.store)
    if args.finetune:
        if args.finetune not in report["finetunes"]:
            raise KenError(f"store {args.store} has no fine-tune {args.finetune!r}; it has: "
                           f"{', '.join(report['finetunes']) or 'none'}")
        report["finetunes"] = {args.finetune: report["finetunes"][args.finetune]}
    if args.tensor:
        pattern = _regex(args.tensor, "--tensor")
        for ft in report["finetunes"].values():
            if "tensors" in ft:
                ft["tensors"] = {k: v for k, v in ft["tensors"].items() if pattern.search(k)}
    broken = {name: ft["error"] for name, ft in report["finetunes"].items() if "error" in ft}
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return _inspect_failed(args.store, broken)
    print(f"store {args.store} (layout version {report.get('format_version')}; each fine-tune's format version below)")
    for name, ft in report["finetunes"].items():
        if name in broken:
            print(f"\nfine-tune {name!r} [UNREADABLE]  {ft['error']}")
            continue
        state = "complete" if ft.get("complete") else "INCOMPLETE"
        print(f"\nfine-tune {name!r} [{state}]  params {ft.get('params')}  (format version {ft['format_version']})")
        print(f"  kept {ft['kept_params']:,} / {ft['pruned_params']:,} pruned weights; stored {human_bytes(ft['stored_bytes'])}"
              f" = {ft['stored_bytes'] / max(1, ft['dense_bytes']):.3f} x dense fine-tune ({human_bytes(ft['dense_bytes'])});"
              f" {ratio_text(ft['bound_ratio'])} x information bound; {ft['bits_per_param']:.3f} bits per parameter"
              " (parts and manifest)")
        for fit in ft.get("scale_fits", []):
            print(f"  scales fitted (fit {fit.get('fit')}, {fit.get('created')}): {fit.get('texts')} text(s), "
                  f"{fit.get('steps')} steps, output error against {fit.get('teacher')} "
                  f"{fit.get('loss_before', float('nan')):.4g} -> {fit.get('loss_after', float('nan')):.4g}")
        if args.tensor or args.finetune:
            print(f"  {'tensor':<48} {'action':>6} {'kept/row min/mean/max':>24} {'kept %':>7} {'bytes':>10} "
                  f"{'x bound':>8}")
            for tname, t in ft["tensors"].items():
                per_row = t["kept_per_row"]
                rows = (f"{per_row['min']}/{per_row['mean']:.1f}/{per_row['max']}"
                        if t["action"] == "prune" else "-")
                print(f"  {tname:<48} {t['action']:>6} {rows:>24} {100 * t['kept_fraction']:>6.1f}% "
                      f"{human_bytes(t['bytes']):>10} {ratio_text(t['ratio']):>8}")
    return _inspect_failed(args.store, broken)


def _inspect_failed(store: str, broken: dict[str, str]) -> int:
    """Exit 2 with one error line when some fine-tune could not be read (the others were shown)."""
    if not broken:
        return 0
    names = ", ".join(map(repr, broken))
    print(f"ken-dist: error: store {store}: {len(broken)} fine-tune(s) cannot be read ({names}), shown as "
          f"UNREADABLE above; {next(iter(broken.values()))}", file=sys.stderr)
    return 2


def _regex(text: str, option: str):
    try:
        return re.compile(text)
    except re.error as exc:
        raise InputError(f"{option} {text!r} is not a valid regular expression: {exc}") from None


def cmd_demo(args) -> int:
    from ken_dist.runtime.warmup import NOTE, compile_if_needed

    # on a machine's first run the kernel compiles while the demo imports torch and starts Ray
    kernel = compile_if_needed()
    if kernel is not None:
        kernel.report_to(lambda: print(f"[ken-dist] {NOTE}", file=sys.stderr, flush=True))
    from ken_dist.cli.demo import run_demo

    return run_demo(args.workdir, keep=args.keep, workers=args.workers)


def cmd_viz(args) -> int:
    from ken_dist.viz.report import render

    result = render(args.store, args.finetune, args.tensor, args.out, base=args.base, delta=args.delta,
                    max_pixels=args.max_pixels, layers=not args.no_layers, single=not args.no_single,
                    progress=stderr_progress(args.quiet))
    print(f"wrote {len(result['figures'])} figure(s) and {result['index']} in {result['seconds']:.1f} s")
    return 0


FIT_CALIB = 512  # calibration texts a fit uses by default (fit-scales --calib, a job's fit_texts)


def read_texts(path: str, limit: int, seed: int) -> list[str]:
    """The calibration texts of `fit-scales --texts`: one per line, blank lines skipped; more than
    `limit` are sampled (seeded) down to it."""
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--texts {path}: cannot read it ({exc}); give a UTF-8 text file, one text per line") from None
    if not texts:
        raise InputError(f"--texts {path} holds no text; give a UTF-8 file with one calibration text per line "
                         "(unlabeled text of the fine-tune's task)")
    if len(texts) > limit:
        import random
        texts = random.Random(seed).sample(texts, limit)
    return texts


def cmd_fit_scales(args) -> int:
    from ken_dist.subnetwork.fit_scales import fit_scales

    texts = read_texts(args.texts, args.calib, args.seed)
    result = fit_scales(args.store, args.finetune, texts, teacher=args.teacher, tokenizer=args.tokenizer,
                        base=args.base, steps=args.steps, lr=args.lr, batch=args.batch, max_length=args.max_length,
                        seed=args.seed, device=args.device,
                        progress=stderr_progress(args.quiet))
    _print_fit(args.finetune, result)
    return 0


def _print_fit(finetune: str, result: dict) -> None:
    print(f"fine-tune {finetune!r}: fitted {result['rows']:,} row multipliers of {result['tensors']} tensor(s) on "
          f"{result['texts']} text(s); output error against the teacher {result['loss_before']:.4g} -> "
          f"{result['loss_after']:.4g}; rewrote {result['parts']} part(s), same size, in {result['seconds']:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ken-dist", description="KEN pruning of fine-tuned checkpoints on Ray.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("prune", help="prune fine-tune(s) against a base into a subnetwork store",
                       description="Prune one or more fine-tuned checkpoints against their base with KEN (or a "
                       "baseline) on Ray, writing the kept entries to a Parquet store. Re-running the same "
                       "command resumes an interrupted job.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", nargs="?", help="pre-trained checkpoint: a directory, a .safetensors file or an HF repo id (local cache)")
    p.add_argument("finetunes", nargs="*", metavar="FINETUNE", help="fine-tuned checkpoint(s) of that base")
    p.add_argument("--job", help="YAML job file instead of BASE FINETUNE... (see jobs/example_job.yaml)")
    p.add_argument("--store", help="subnetwork store directory (created if missing)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=int, help="entries kept per row")
    group.add_argument("--keep", type=float, help="fraction kept, in (0, 1]: per row, k = max(1, round(keep*n)); "
                       "of the whole fine-tune for the *-model strategies")
    p.add_argument("--name", action="append", help="store name of each fine-tune (default: its directory name)")
    from ken_dist.kernel import STRATEGIES
    p.add_argument("--strategy", default="ken", help=f"one of {', '.join(sorted(STRATEGIES))} (default ken, the "
                   "paper's rule; docs/quality.md says which to use when)")
    p.add_argument("--compat", default="index", choices=["index", "reference"],
                   help="index: exactly k per row (default); reference: the published code's value-based mask")
    p.add_argument("--seed", type=int, default=0, help="seed of seeded strategies (random)")
    p.add_argument("--values", default="raw", metavar="CODEC",
                   help="how kept values are stored: raw (exact bytes, the default) or a lossy code of the delta to "
                   "the base: int8, int4, int2, sign (1 bit + a scale), with -gG for a scale per G kept entries "
                   "(e.g. int4-g64); docs/format.md 'Value codecs'")
    p.add_argument("--include", action="append", metavar="RE", help="prune only tensors whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="RE", help="never prune tensors whose name matches (repeatable)")
    p.add_argument("--preset", choices=["all", "attention-only"],
                   help="tensors to prune: all float tensors (default) or attention projections only (as in the KEN paper)")
    p.add_argument("--ignore-missing", action="append", metavar="RE",
                   help="base tensors the fine-tune may lack (e.g. '^lm_head\\.' when a classifier replaced the LM head)")
    p.add_argument("--map-prefix", action="append", type=parse_prefix, metavar="FT=BASE",
                   help="rename fine-tune name prefix FT to BASE when matching tensors (e.g. 'bert.=')")
    p.add_argument("--revision", help="base revision when BASE is an HF repo id")
    from ken_dist.job.plan import DEFAULT_BLOCK_BYTES
    p.add_argument("--block-bytes", type=byte_size, default=DEFAULT_BLOCK_BYTES,
                   help="rows per work unit, in bytes of fine-tuned data (default 64MiB)")
    p.add_argument("--address", help="join this Ray cluster (default: a private local Ray)")
    p.add_argument("--workers", type=int, help="actors (default: one per GPU plus one per CPU left)")
    p.add_argument("--placement", choices=["mixed", "gpu", "cpu"],
                   help="mixed (default): GPU actors on GPUs plus CPU actors on the other CPUs; "
                   "gpu: GPU actors only; cpu: CPU actors only")
    p.add_argument("--overwrite", action="store_true", help="replace a fine-tune stored with other parameters")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("materialize", help="write a dense, loadable checkpoint from the store")
    p.add_argument("store")
    p.add_argument("--finetune", required=True, help="name of the fine-tune in the store")
    p.add_argument("--out", required=True, help="output directory (a Hugging Face model directory)")
    p.add_argument("--base", help="where the base checkpoint is now, if it moved since pruning")
    p.add_argument("--shard-bytes", type=byte_size, default=5 * 10**9, help="max safetensors shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("fit-scales", help="fit a lossy fine-tune's stored scales to its dense fine-tune on unlabeled text",
                       description="Fit one multiplier per row of the stored scales of a fine-tune pruned with a lossy "
                       "--values codec, so that the model as stored matches the dense fine-tune's outputs on "
                       "calibration texts (BitDelta's distillation step; no labels). Rewrites the fine-tune's lossy "
                       "parts in place, atomically, at the same size. docs/quality.md says what it recovers.")
    p.add_argument("store")
    p.add_argument("--finetune", required=True, help="name of the fine-tune in the store")
    p.add_argument("--texts", required=True, metavar="FILE", help="calibration texts, one per line (unlabeled)")
    p.add_argument("--teacher", metavar="DIR", help="the dense fine-tune (default: the one the store was pruned from)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the teacher's)")
    p.add_argument("--base", help="where the base checkpoint is now, if it moved since pruning")
    p.add_argument("--calib", type=int, default=FIT_CALIB, help="texts used; more are sampled down to this (default 512)")
    p.add_argument("--steps", type=int, default=40, help="Adam steps (default 40)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--batch", type=int, default=32, help="texts per step (default 32)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the text sample and the batches")
    p.add_argument("--device", help="where the fit runs (default cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_fit_scales)

    p = sub.add_parser("inspect", help="fine-tunes, tensors, kept weights, bytes and ratios of a store")
    p.add_argument("store")
    p.add_argument("--finetune", help="only this fine-tune, with per-tensor detail")
    p.add_argument("--tensor", metavar="RE", help="only tensors matching RE, with per-tensor detail")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="generate a small checkpoint pair, prune it on a local Ray, print the summary")
    p.add_argument("--workdir", default=None, help="where to write the pair and the store (default: a temp dir)")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("viz", help="KENviz: figures of kept entries and their neighbours, with index.html")
    p.add_argument("store")
    p.add_argument("--finetune", required=True, help="name of the fine-tune in the store")
    p.add_argument("--tensor", metavar="RE", default=None, help="only pruned matrices whose name matches RE (default: all)")
    p.add_argument("--out", required=True, help="output directory (index.html + PNGs)")
    p.add_argument("--delta", action="store_true", help="colour kept entries by fine-tuned - base (reads the base)")
    p.add_argument("--base", help="where the base checkpoint is now, if it moved since pruning")
    p.add_argument("--max-pixels", type=int, default=1024,
                   help="longer image side; larger matrices are shown as pixel blocks (statistics stay exact)")
    p.add_argument("--no-single", action="store_true", help="only the layer-wise grids and the statistics")
    p.add_argument("--no-layers", action="store_true", help="no layer-wise grids")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_viz)
    from ken_dist.cli.ray_jobs import add_job_verbs
    add_job_verbs(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KenError as exc:
        print(f"ken-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ken-dist: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
