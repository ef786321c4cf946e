"""`jaxllm <verb>`: train, generate, tokenizer, data, convert, curate, demo."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from jaxllm.configlib import ConfigError


def _train(args):
    from jaxllm.config import load_config
    from jaxllm.training.loop import train
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    summary.pop("state", None)
    summary.pop("history", None)
    print(json.dumps(summary, indent=1))


def _demo(args):
    from jaxllm.config import load_config
    from jaxllm.training.loop import train
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    print(f"demo: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} "
          f"over {summary['steps']} steps; run dir {summary['run_dir']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    tr = sub.add_parser("train", help="train any objective from a YAML recipe")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tr.set_defaults(func=_train)
    de = sub.add_parser("demo", help="train the tiny model on the embedded default data")
    de.add_argument("config", nargs="?", default="configs/pretrain/tiny.yaml")
    de.add_argument("overrides", nargs="*")
    de.set_defaults(func=_demo)
    # Sub-packages own their verbs; each exposes register(subparsers).
    for mod in ("jaxllm.data.cli", "jaxllm.curate.cli", "jaxllm.interop.cli"):
        try:
            importlib.import_module(mod).register(sub)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"jaxllm: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
