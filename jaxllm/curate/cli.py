"""`jaxllm curate CONFIG [key=value ...]` and `jaxllm curate train-classifier ...`.

jaxllm/cli.py calls `register(subparsers)`; everything after `curate` is parsed here, so
the two forms can share one sub-command. Every expected failure is one line on stderr,
`jaxllm curate: error: <what, where, what to do>`, and an exit status: 2 for a UserError
(config, input, missing package), 1 for a RunError or an OS-level failure while running
(disk full, permission denied). `jaxllm --traceback` or JAXLLM_TRACEBACK=1 shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter

from jaxllm.errors import RunError, UserError

USAGE = """\
jaxllm curate CONFIG [key=value ...]
    Filter and deduplicate raw documents as the YAML CONFIG says (see configs/curate/);
    overrides use the config's dotted keys, e.g. runner.processes=2 runner.kind=beam.

jaxllm curate train-classifier --hq GLOB [GLOB ...] --crawl GLOB [GLOB ...] --out MODEL.npz
                               [--config CONFIG] [--max-docs N] [key=value ...]
    Train the quality classifier on high-quality reference documents (label 1) against
    raw crawl (label 0); classifier.* keys set its hyper-parameters. Point
    classifier.model_path at the result to use it.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("curate", help="pretraining data curation: filters, dedup, report",
                              description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="jaxllm curate CONFIG [key=value ...] | train-classifier ...")
    p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if not argv:
        print(f"usage:\n{USAGE}", file=sys.stderr, end="")
        raise SystemExit(2)
    try:
        if argv[0] == "train-classifier":
            return train_classifier_main(argv[1:])
        return curate_main(argv)
    except (UserError, RunError, OSError) as e:
        if getattr(args, "traceback", False) or os.environ.get("JAXLLM_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"jaxllm curate: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", 1)) from None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, (UserError, RunError)) and e.filename:
        msg = (f"{e.strerror or e}: {e.filename}; check that path's permissions and free space "
               f"(or choose another output.dir / runner.work_dir)")
    else:
        msg = str(e)
    return " ".join(msg.split())


def curate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxllm curate", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (configs/curate/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    a = p.parse_args(argv)
    from jaxllm.curate import config
    rep = run(config.load(a.config, a.overrides))
    print(format_report(rep))
    return 0


def run(cfg) -> dict:
    """Run the configured runner."""
    if cfg.runner.kind == "beam":
        from jaxllm.curate import checks
        checks.require_beam()
        from jaxllm.curate import runner_beam
        return runner_beam.run(cfg)
    from jaxllm.curate import runner_local
    return runner_local.run(cfg)


def format_report(rep: dict) -> str:
    lines = [f"{'stage':<20}{'in':>10}{'removed':>10}{'kept':>10}  reasons"]
    bad = sum(rep["input"]["bad_records"].values())
    lines.append(f"{'read':<20}{rep['input']['records']:>10}{bad:>10}"
                 f"{rep['input']['records'] - bad:>10}  {rep['input']['bad_records']}")
    for s in rep["stages"]:
        lines.append(f"{s['stage']:<20}{s['in']:>10}{sum(s['removed'].values()):>10}{s['kept']:>10}  "
                     f"{s['removed']}")
    for sk in rep["input"]["skipped_shards"]:
        lines.append(f"skipped unreadable input {sk['path']}: {sk['error']}")
    lines.append(f"output: {rep['output']['docs']} documents in {rep['output']['shards']} shards")
    return "\n".join(lines)


def read_texts(patterns: list[str], cfg, max_docs: int) -> list[str]:
    from jaxllm.curate import checks, io
    inp = dataclasses.replace(cfg.input, paths=tuple(patterns))
    texts: list[str] = []
    bad: Counter = Counter()
    shards = io.list_shards(inp)
    checks.check_input_packages(shards, inp)
    for i, path in enumerate(shards):
        shard_texts: list[str] = []
        try:
            for rec in io.read_shard(path, i, inp, bad):
                shard_texts.append(rec.text)
                if max_docs and len(texts) + len(shard_texts) >= max_docs:
                    return texts + shard_texts
        except io.BadShardError as e:
            if not inp.skip_bad_shards:
                raise
            print(f"train-classifier: skipped input {path} ({e.cause}) as "
                  f"input.skip_bad_shards=true asks")
            continue
        texts += shard_texts
    skipped = {k: v for k, v in bad.items() if k != "read/records"}
    if skipped:
        print(f"train-classifier: skipped bad records in {patterns}: {skipped}")
    return texts


def train_classifier_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxllm curate train-classifier", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hq", nargs="+", required=True, help="high-quality reference documents (globs)")
    p.add_argument("--crawl", nargs="+", required=True, help="raw crawl documents (globs)")
    p.add_argument("--out", required=True, help="model file to write (.npz)")
    p.add_argument("--config", default=None, help="curate YAML whose input.* and classifier.* apply")
    p.add_argument("--max-docs", type=int, default=0, help="at most this many documents per class")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="held out (seeded) to report accuracy before the final fit")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    a = p.parse_args(argv)
    import numpy as np

    from jaxllm.curate import classifier, config
    cfg = config.load(a.config, a.overrides)
    hq, crawl = read_texts(a.hq, cfg, a.max_docs), read_texts(a.crawl, cfg, a.max_docs)
    rng = np.random.default_rng(cfg.classifier.seed)
    mask_hq = rng.random(len(hq)) < a.eval_fraction
    mask_cr = rng.random(len(crawl)) < a.eval_fraction
    if mask_hq.any() and mask_cr.any() and (~mask_hq).any() and (~mask_cr).any():
        m = classifier.train([t for t, e in zip(hq, mask_hq) if not e],
                             [t for t, e in zip(crawl, mask_cr) if not e], cfg.classifier)
        s_hq = m.score([t for t, e in zip(hq, mask_hq) if e])
        s_cr = m.score([t for t, e in zip(crawl, mask_cr) if e])
        acc = (np.sum(s_hq >= 0.5) + np.sum(s_cr < 0.5)) / (s_hq.size + s_cr.size)
        print(f"train-classifier: held-out accuracy {acc:.3f} on {s_hq.size} hq + {s_cr.size} crawl")
    model = classifier.train(hq, crawl, cfg.classifier)
    model.save(a.out)
    print(f"train-classifier: {len(hq)} hq + {len(crawl)} crawl documents -> {a.out}")
    return 0
