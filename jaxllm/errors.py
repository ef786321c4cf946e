"""Expected failures: what the CLI prints as one line (what, where, what to do) and exits on.

    UserError  exit 2   bad config, bad input file, bad argument: the user fixes the input
    RunError   exit 1   a run that cannot go on (corrupt checkpoint, non-finite loss, dead peer)

Modules raise their own subclasses (ConfigError, DataError, CheckpointError, ...) so callers
can catch narrowly; `jaxllm.cli.main` catches these two bases and prints `jaxllm: error: ...`
without a traceback unless `--traceback` or JAXLLM_TRACEBACK=1. This module imports nothing,
so every layer can use it without import cycles.
"""
from __future__ import annotations


class UserError(ValueError):
    """The input is wrong (config key, file, argument); the message names it and what is valid."""
    exit_code = 2


class RunError(RuntimeError):
    """The run cannot continue; the message says what happened and what to do next."""
    exit_code = 1
