"""`jaxllm <verb>`: train, demo, plan, data, tokenizer, convert, curate.

An expected failure prints one line (`jaxllm: error: what, where, what to do`) and exits 2
(bad config or input) or 1 (the run cannot go on); `--traceback` or JAXLLM_TRACEBACK=1 shows
the stack as well.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from jaxllm.errors import RunError, UserError


def _host_alloc() -> None:
    """Before the backend starts its threads; the run prints the line once it has started."""
    from jaxllm import host_alloc
    host_alloc.keep_pages()


def _train(args):
    _host_alloc()
    from jaxllm.config import load_config
    from jaxllm.training.recipes import train
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("state", "history", "frozen")}, indent=1))


def _demo(args):
    _host_alloc()
    if args.config is None:
        from jaxllm.demo.pipeline import run
        run(args.out, quick=args.quick, force=args.force, full_sft=args.full_sft, only=args.stage)
        return
    # The older form, `jaxllm demo CONFIG [key=value ...]`: one recipe, as `jaxllm train` runs it.
    if args.quick or args.force or args.full_sft or args.stage or args.out != "runs/demo":
        raise UserError("demo: --out/--quick/--force/--full-sft/--stage belong to the pipeline "
                        "(`jaxllm demo` without CONFIG); `jaxllm demo CONFIG` trains one recipe")
    from jaxllm.config import load_config
    from jaxllm.training.pretrain import train
    cfg = load_config(args.config, args.overrides)
    s = train(cfg)
    if s["first_loss"] is None:
        print(f"demo: nothing trained; run dir {s['run_dir']}")
        return
    done = " (already finished earlier)" if s.get("already_finished") else ""
    print(f"demo: loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} over {s['steps']} steps{done}; "
          f"run dir {s['run_dir']}")


def _plan(args):
    from jaxllm.training import plan
    savers = list(plan.SAVERS) if args.savers == "all" else [] if args.savers == "none" else \
        [x.strip() for x in args.savers.split(",") if x.strip()]
    unknown = [x for x in savers if x not in plan.SAVERS]
    if unknown:
        raise UserError(f"plan --savers: unknown {unknown}; choose from {list(plan.SAVERS)}, 'all' or 'none'")
    if args.devices < 1:
        raise UserError(f"plan --devices must be >= 1, got {args.devices}")
    if not 0 < args.device_gb < float("inf"):   # NaN is refused too
        raise UserError(f"plan --device-gb must be a positive number of GB, got {args.device_gb:g}")
    code = plan.run_in_child(args.config, args.overrides, args.devices, savers, args.device_gb)
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traceback", action="store_true", help="show the stack of an expected failure")
    sub = p.add_subparsers(dest="verb", required=True)
    tr = sub.add_parser("train", help="train any objective from a YAML recipe")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tr.set_defaults(func=_train)
    de = sub.add_parser("demo", help="the whole pipeline on generated data: curation, tokenizer, pretraining, "
                                     "SFT, reward model, PPO, and a report comparing the models")
    de.add_argument("--out", default="runs/demo", help="the demo directory (default: %(default)s)")
    de.add_argument("--quick", action="store_true", help="the same stages on tiny budgets (configs/demo/quick.yaml)")
    de.add_argument("--force", action="store_true", help="redo stages whose output exists")
    de.add_argument("--full-sft", action="store_true", help="SFT every parameter instead of LoRA")
    de.add_argument("--stage", action="append", metavar="NAME",
                    help="run only this stage (repeatable); the stages are listed as the demo runs")
    de.add_argument("config", nargs="?", default=None,
                    help="(older form) train only this recipe, as `jaxllm train CONFIG` does")
    de.add_argument("overrides", nargs="*", help="key.sub=value overrides of CONFIG")
    de.set_defaults(func=_demo)
    pl = sub.add_parser("plan", help="device memory of a config's train step on N devices, with and without "
                                     "each memory saver (compiled on simulated CPU devices, nothing runs)")
    pl.add_argument("config", help="a recipe YAML, or - for the built-in defaults")
    pl.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pl.add_argument("--devices", type=int, default=8, help="simulated devices (default: %(default)s)")
    pl.add_argument("--device-gb", type=float, default=80.0,
                    help="memory per device in GB (10^9 bytes, as datasheets give it) for the 'fits' column "
                         "(default: %(default)s)")
    pl.add_argument("--savers", default="all",
                    help="comma-separated savers to compare, 'all' or 'none' (default: %(default)s)")
    pl.set_defaults(func=_plan)
    # Sub-packages own their verbs; each exposes register(subparsers).
    for mod in ("jaxllm.data.cli", "jaxllm.curate.cli", "jaxllm.interop.cli", "jaxllm.evaluation.cli"):
        try:
            importlib.import_module(mod).register(sub)
        except ModuleNotFoundError as e:
            if not (e.name and (mod == e.name or mod.startswith(e.name + "."))):
                raise   # a missing dependency inside the module is a real error
    return p


def _expected(e: BaseException) -> int | None:
    """Exit code of an expected failure, None for a bug (which keeps its traceback)."""
    if isinstance(e, (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return 2   # the input is wrong: a config key, a path
    if isinstance(e, (RunError, OSError)):
        return 1
    cause = e.__cause__ or e.__context__
    # grain re-raises errors from its reader threads/workers wrapped in its own types
    return _expected(cause) if cause is not None and cause is not e else None


def _peer_failure(e: BaseException) -> str | None:
    """One line for a runtime error of a multi-process run: a collective that fails there is
    almost always a peer that died or was stopped (gloo: "Received data size doesn't match",
    NCCL: "remote process exited"), which JAX reports as an internal error."""
    jax = sys.modules.get("jax")
    if jax is None or not isinstance(e, jax.errors.JaxRuntimeError):
        return None
    try:
        n, i = jax.process_count(), jax.process_index()
    except Exception:  # noqa: BLE001 - the backend itself may be gone
        return None
    if n <= 1:
        return None
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return (f"process {i} of {n}: a computation with the other processes failed, most likely because "
            f"a peer process died or was stopped; relaunch every process to resume from the last "
            f"checkpoint (JAX: {first})")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show = "--traceback" in argv or os.environ.get("JAXLLM_TRACEBACK") == "1"
    args = build_parser().parse_args([a for a in argv if a != "--traceback"])
    try:
        args.func(args)
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into exit codes
        code = _expected(e)
        peer = _peer_failure(e) if code is None else None
        if peer is not None and not show:
            print(f"jaxllm: error: {peer}", file=sys.stderr)
            return 1
        if code is None or show:
            raise
        root = e
        while not isinstance(root, (UserError, RunError, OSError)) and (root.__cause__ or root.__context__):
            root = root.__cause__ or root.__context__
        print(f"jaxllm: error: {root}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
