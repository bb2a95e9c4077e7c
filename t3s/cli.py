"""The ``t3s`` command.

    t3s run CONFIG.yaml [key=value ...] [--redo STAGE]
                                            the whole pipeline; a re-run reuses every finished stage whose
                                            config keys, inputs and outputs are unchanged, and says why
                                            it re-runs the others (--redo STAGE re-runs one anyway)
    t3s demo [--seeds K] [--first-seed S] [key=value ...] [--redo STAGE]
                                            the offline CPU demo (t3s/configs/demo.yaml); K seeds
                                            give mean ± sd per model and problem family;
                                            runtime.portable=true unless overridden
    t3s train CONFIG.yaml [key=value ...] [--selection DIR] [--out DIR] [--mode ar|dllm]
                                            one training run (AR SFT / a selection, or block diffusion)
    t3s profile --model M --data D --out S  per-token confidence c_t of one checkpoint
    t3s select --delta S --rule t3s --out O token selection from a Δc store
    t3s report RUN_DIR                      rebuild a run's report from its files

Overrides use dotted keys and YAML values: ``optim.lr=5e-4 variants=[sft,t3s] bottleneck.method=fixed``.
``runtime.portable=true`` pins every instruction-set choice that changes float results to AVX2 (PyTorch's
kernels, MKL, oneDNN), so a CPU run gives the same bytes on any x86-64 CPU type (t3s.runtime.PORTABLE_ENV).
Multi-GPU: ``torchrun --nproc-per-node 8 -m t3s.cli run CONFIG.yaml`` (FSDP2; ``distributed.strategy=ddp``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from t3s.config import ConfigError, config_path, load_config
from t3s.io import RunFault

_STARTED = time.time()  # reset by main(); the printed runtime covers the whole command


def _offline() -> None:
    # Nothing is downloaded at run time: models, tokenizers and data are local paths.
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")


_AS_COMMAND = False  # main() runs as the process's own command (console script, ``python -m``, torchrun)


def _load(path, overrides: list[str]):
    """The config, then the threading and instruction-set environment it asks for, set before torch is first
    imported."""
    from t3s.runtime import pin_threading_env

    cfg = load_config(path, overrides)
    pin_threading_env(cfg.runtime.threads)
    if cfg.runtime.portable:
        _pin_portable()
    return cfg


def _pin_portable() -> None:
    """``runtime.portable``: the AVX2 pins, in force before torch dispatches anything.

    Torch is not imported yet on the command's own path, so setting the environment suffices. If it is (a
    caller imported it first), the command re-starts itself with the pins set, the only way to be sure no
    library read its dispatch level already; called as a library function it cannot, and leaves the warning to
    :func:`t3s.runtime.apply_runtime` (once the config is validated, so a config error stays one line);
    ``provenance.json`` records what is in force.
    """
    from t3s.runtime import PORTABLE_ENV, portable_env_missing

    if "torch" not in sys.modules or not portable_env_missing():
        os.environ.update(PORTABLE_ENV)
    elif _AS_COMMAND:
        os.environ.update(PORTABLE_ENV)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)
    from t3s.pipeline import run_pipeline
    from t3s.report import format_table

    report = run_pipeline(cfg, progress=not args.no_progress, redo=args.redo)
    _print_result(cfg, report, format_table)
    return 0


def _print_result(cfg, report: Path, format_table) -> None:
    from t3s import distributed as D

    if D.is_main():
        print("\n" + format_table(cfg.run_dir, cfg) + "\n")
        minutes, seconds = divmod(round(time.time() - _STARTED), 60)
        print(f"report: {report}  (this command: {minutes} min {seconds:02d} s)")


def demo_config(overrides: list[str]):
    """The demo's config: packaged ``demo.yaml`` (if present) + overrides."""
    try:
        path = config_path("demo")
    except ConfigError:
        path = None
    # portable by default: the README's numbers must reproduce on the reader's x86-64 CPU type too
    return _load(path, ["runtime.portable=true", *overrides])


def _demo_one(overrides: list[str], *, progress: bool, redo=()) -> dict:
    """One demo run (pretrain θ0 if needed, the pipeline, per-family evaluation); returns the family results."""
    cfg = demo_config(overrides)
    from t3s.demo import PretrainSpec, TaskSpec, TinyModelSpec, prepare_demo
    from t3s.preflight import check_kwargs
    from t3s.runlock import run_dir_lock
    from t3s.runtime import apply_runtime

    specs = {"task": TaskSpec, "model": TinyModelSpec, "pretrain_spec": PretrainSpec}
    check_kwargs("demo", prepare_demo, cfg.demo, nested=specs, reserved=("run_dir", "log"))
    kw = dict(cfg.demo)
    for key, cls in specs.items():
        if isinstance(kw.get(key), dict):
            kw[key] = cls(**kw[key])
    apply_runtime(cfg.runtime, cfg.train.seed)  # θ0's pretraining is part of the run's numbers too
    with run_dir_lock(cfg.run_dir):  # a second demo on this folder is refused before it builds anything
        return _demo_in(cfg, overrides, kw, progress=progress, redo=redo)


def _demo_in(cfg, overrides: list[str], kw: dict, *, progress: bool, redo) -> dict:
    """The demo's assets, then the pipeline, with the run directory's lock held by the caller."""
    from t3s.demo import prepare_demo
    from t3s.demo.results import evaluate_families
    from t3s.pipeline import run_pipeline
    from t3s.report import format_table

    asset_keys = ("model.path", "model.tokenizer", "data.train", "data.heldout")
    assets = prepare_demo(cfg.run_dir, **kw)
    explicit = {o.split("=", 1)[0] for o in overrides}
    for key, value in zip(asset_keys, (assets.base_model_dir, assets.tokenizer_dir, assets.train_path,
                                       assets.heldout_path), strict=True):
        if key not in explicit:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, str(value))
    print(assets.description)
    report = run_pipeline(cfg, progress=progress, description=assets.description, redo=redo)
    _print_result(cfg, report, format_table)
    return evaluate_families(cfg.run_dir, cfg, assets.heldout_family_paths)


def cmd_demo(args: argparse.Namespace) -> int:
    from t3s import distributed as D
    from t3s.demo.results import format_seed_tables
    from t3s.io import write_json_atomic, write_text_atomic

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    base = demo_config(args.overrides)
    out_dir = Path(base.run_dir)
    # --first-seed S runs seeds S, S+1, ...; the training seed moves with it (train.seed - demo.seed stays fixed)
    seed0 = int(base.demo.get("seed", 0)) if args.first_seed is None else args.first_seed
    train_seed0 = int(base.train.seed) + seed0 - int(base.demo.get("seed", 0))
    if args.seeds == 1:
        pin = [] if args.first_seed is None else [f"demo.seed={seed0}", f"train.seed={train_seed0}"]
        results = {seed0: _demo_one([*args.overrides, *pin], progress=not args.no_progress, redo=args.redo)}
    else:
        results = {}
        for i in range(args.seeds):
            seed = seed0 + i
            print(f"\n===== demo seed {seed} ({i + 1}/{args.seeds}) =====")
            results[seed] = _demo_one([*args.overrides, f"run_dir={out_dir / f'seed{seed}'}",
                                       f"demo.seed={seed}", f"train.seed={train_seed0 + i}"],
                                      progress=not args.no_progress, redo=args.redo)
    table = format_seed_tables(results)
    if D.is_main():
        write_text_atomic(out_dir / "seeds.md", table + "\n")
        write_json_atomic(out_dir / "seeds.json", {str(k): v for k, v in results.items()})
        print("\n" + table + "\n")
        print(f"per-family results: {out_dir / 'seeds.md'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides + ([f"train.mode={args.mode}"] if args.mode else []))
    from t3s.data import load_records, tokenize_records
    from t3s.preflight import check_dllm, check_model_dir, check_tokenizer_dir
    from t3s.runtime import apply_runtime
    from t3s.select import apply_selection, load_selection
    from t3s.train import load_tokenizer, run_dllm_training, run_training

    check_model_dir("model.path", cfg.model.path)
    check_tokenizer_dir("model.tokenizer" if cfg.model.tokenizer else "model.path",
                        cfg.model.tokenizer or cfg.model.path)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    if cfg.train.mode == "dllm":
        check_dllm(cfg, tok)  # before any data is read or any output exists
    apply_runtime(cfg.runtime, cfg.train.seed)
    d = cfg.data
    records = load_records(d.train, format=d.format, adapter=d.adapter, limit=d.max_examples, require_answer=False)
    examples = tokenize_records(records, tok, max_tokens=d.max_length, truncation=d.truncation)
    if args.selection:
        examples = apply_selection(examples, load_selection(args.selection))
    out = Path(args.out or Path(cfg.run_dir) / "train")
    if cfg.train.mode == "dllm":
        final = run_dllm_training(cfg, examples, out)
    else:
        final = run_training(cfg, examples, out, progress=not args.no_progress).final_dir
    print(f"model: {final}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from t3s.report import build_report, format_table

    run = Path(args.run_dir)
    if not (run / "config.yaml").exists():
        raise ConfigError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml", args.overrides)
    path = build_report(run, cfg)
    print("\n" + format_table(run, cfg) + "\n")
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t3s", description="T3S: Training-Trajectory-Aware Token Selection.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_overrides(sp, config: bool = True, redo: bool = False):
        if config:
            sp.add_argument("config", help="YAML config (see t3s/configs/default.yaml)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        if redo:
            sp.add_argument("--redo", action="append", default=[], metavar="STAGE",
                            help="re-run this stage even if finished (repeatable; patterns like 'eval_*'); "
                                 "later stages re-run when its outputs change")
        return sp

    with_overrides(sub.add_parser("run", help="run or resume the whole pipeline"), redo=True).set_defaults(
        fn=cmd_run)
    dm = with_overrides(sub.add_parser("demo", help="offline CPU demo (runtime: see README)"), config=False,
                        redo=True)
    dm.add_argument("--seeds", type=int, default=1,
                    help="run K pretraining / distillation seeds (demo.seed, demo.seed+1, ...; each in RUN_DIR/seedN) "
                         "and report mean ± sd per model and family")
    dm.add_argument("--first-seed", type=int, default=None, metavar="S",
                    help="start at seed S instead of demo.seed (train.seed moves with it)")
    dm.set_defaults(fn=cmd_demo)
    tr = with_overrides(sub.add_parser("train", help="one training run (SFT, a selection, or dLLM)"))
    tr.add_argument("--selection", help="selection folder from `t3s select` (per-token weights / dLLM targets)")
    tr.add_argument("--out", help="output folder (default RUN_DIR/train)")
    tr.add_argument("--mode", choices=("ar", "dllm"), help="shorthand for train.mode=...")
    tr.set_defaults(fn=cmd_train)
    rp = sub.add_parser("report", help="rebuild a run's report")
    rp.add_argument("run_dir")
    rp.add_argument("overrides", nargs="*", metavar="key=value")
    rp.set_defaults(fn=cmd_report)
    sub.add_parser("profile", help="per-token confidence of one checkpoint (see t3s profile -h)", add_help=False)
    sub.add_parser("select", help="token selection from a Δc store (see t3s select -h)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    global _STARTED, _AS_COMMAND
    _STARTED = time.time()
    _AS_COMMAND = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _offline()
    if argv and argv[0] in ("profile", "select"):  # their own parsers, owned by t3s.profile / t3s.select
        if argv[0] == "profile":
            from t3s.profile import profile_main

            return profile_main(argv[1:])
        from t3s.select import select_main

        return select_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the flags (`t3s train cfg.yaml --mode dllm train.steps=3`).
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    ok = False
    try:
        rc = args.fn(args)
        ok = True
        return rc
    except (ConfigError, ValueError, FileNotFoundError, RunFault) as e:
        if os.environ.get("T3S_TRACEBACK"):
            raise
        print(f"t3s {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        from t3s import distributed as D

        D.cleanup(sync=ok)  # after an error the other ranks may never reach a barrier


if __name__ == "__main__":
    sys.exit(main())
