"""`jaxllm demo`: the whole pipeline on this machine, each stage as its own command would run it.

    run("runs/demo")                      # every stage whose output is missing or stale
    run("runs/demo", quick=True)          # the same stages on tiny budgets (configs/demo/quick.yaml)
    run("runs/demo", only=["report"])     # one stage (`jaxllm demo --stage report`)

Stages run in order with the demo directory as the current directory (the paths in
configs/demo/*.yaml are relative to it), so each printed command reruns its stage from there.
A stage whose output is complete is skipped, said in one line; a stage after one that ran
again is redone (its old output removed first), since what it read has changed; `force`
redoes every stage. A training stage stopped by SIGTERM/SIGINT saves its checkpoint and the
demo stops; the next run resumes that stage at its step (the recipes resume from their run
dirs) after skipping the finished stages. Seconds per stage are kept in stages.json.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from jaxllm.demo import config as demo_config
from jaxllm.demo.stages import Context, Interrupted, all_stages, remove
from jaxllm.errors import RunError, UserError

TIMES = "stages.json"
SETTINGS = "demo.json"


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def reward_recipe_missing() -> str | None:
    """Why no reward model can be trained here (then PPO scores with the programmatic
    reward), or None."""
    try:
        import jaxllm.training.reward  # noqa: F401
    except ModuleNotFoundError:
        return "the reward-model recipe (jaxllm/training/reward.py) is not in this checkout"
    return None


def _check_settings(settings: dict, force: bool) -> None:
    """A demo directory holds one kind of run: refuse to mix --quick / --full-sft outputs."""
    if os.path.exists(SETTINGS):
        with open(SETTINGS) as f:
            before = json.load(f)
        if before != settings and not force:
            def flags(s):
                return " ".join(["--quick"] * s["quick"] + ["--full-sft"] * s["full_sft"]) or "no flags"
            raise UserError(f"{os.getcwd()} was made with {flags(before)}, and this run has {flags(settings)}: "
                            f"give the same flags, --force to redo every stage, or another --out")
    with open(SETTINGS, "w") as f:
        json.dump(settings, f)


def _load_times() -> dict:
    try:
        with open(TIMES) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_times(times: dict) -> None:
    with open(TIMES + ".tmp", "w") as f:
        json.dump(times, f, indent=1)
    os.replace(TIMES + ".tmp", TIMES)


def run(out: str = "runs/demo", *, quick: bool = False, force: bool = False, full_sft: bool = False,
        only: list[str] | None = None) -> int:
    out = os.path.abspath(out)
    cfg, cfg_path = demo_config.load(quick)
    ctx = Context(out, cfg, cfg_path, quick, full_sft, reward_recipe_missing())
    stages = all_stages(ctx)
    names = [s.name for s in stages]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise UserError(f"demo: unknown stage {unknown}; the stages are {names}")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    with contextlib.chdir(out):
        _check_settings({"quick": quick, "full_sft": full_sft}, force)
        log(f"{len(stages)} stages in {out} ({'quick' if quick else 'full'} sizes: {cfg_path}); "
            f"each runs from that directory with the command shown")
        times = _load_times()
        this_run: dict[str, float | str] = {}
        ran_before = None   # the last stage that ran in this invocation: what follows is stale
        for i, st in enumerate(stages):
            if only and st.name not in only:
                continue
            head = f"[{i + 1}/{len(stages)}] {st.name}"
            cannot = st.cannot(ctx)
            if cannot:
                log(f"{head}: skipped, {cannot}")
                this_run[st.name] = "cannot"
                times[st.name] = {"status": "skipped", "why": cannot}
                continue
            # what the demo did not write (stages.json has no record of this stage) is the user's:
            # never taken as this stage's output, never deleted
            foreign = [p for p in st.outputs(ctx) if os.path.exists(p)] if st.name not in times else []
            if foreign:
                raise UserError(f"demo: {', '.join(os.path.join(out, p) for p in foreign)} exists and was not "
                                f"written by the demo's {st.name} stage ({TIMES} has no record of it): "
                                f"move it away or choose another --out")
            done = st.done(ctx)
            redo = "--force" if force else (f"{ran_before} ran again" if ran_before else None)
            if done and not redo:
                log(f"{head}: skipped, {done} (--force redoes it)")
                this_run[st.name] = "skipped"
                continue
            resume = None
            if redo:
                if any(os.path.exists(p) for p in st.outputs(ctx)):
                    log(f"{head}: redoing it ({redo}): removing {', '.join(st.outputs(ctx))}")
                    remove(st.outputs(ctx))
                times.pop(st.name, None)
            else:
                resume = st.started(ctx)
            cmd = st.command(ctx)
            log(f"{head}: {st.what}" + (f"; {resume}" if resume else "") + f"\n    $ {cmd}")
            t0 = time.perf_counter()
            prev = times.get(st.name, {}) if resume else {}
            # recorded before it runs: a stage killed midway left outputs the demo wrote
            times[st.name] = {**prev, "status": "running", "command": cmd}
            _save_times(times)
            try:
                line = st.run(ctx)
            except Interrupted as e:
                dt = time.perf_counter() - t0
                times[st.name] = {"status": "interrupted", "seconds": prev.get("seconds", 0.0) + dt,
                                  "command": cmd, "runs": prev.get("runs", 0) + 1}
                _save_times(times)
                raise RunError(f"demo: {e} after {dt:.0f} s; run the same `jaxllm demo` command again to "
                               f"resume it (finished stages are skipped)") from None
            dt = time.perf_counter() - t0
            times[st.name] = {"status": "done", "seconds": prev.get("seconds", 0.0) + dt, "command": cmd,
                              "runs": prev.get("runs", 0) + 1}
            _save_times(times)
            this_run[st.name] = dt
            ran_before = st.name
            log(f"{head}: done in {dt:.1f} s: {line}")
        total = time.perf_counter() - t_start
        log("seconds per stage (this run): " + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in this_run.items())
            + f"; total {total:.1f}")
        if not only or "report" in only:
            from jaxllm.demo.report import summary_lines
            print(f"demo: report at {os.path.join(out, 'report.md')}")
            for line in summary_lines(ctx):
                print(f"  {line}")
    return 0
