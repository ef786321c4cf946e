"""The training loop every recipe shares: batches -> the one step -> metrics, evaluation,
checkpoints, preemption, the non-finite stop.

    summary = fit(run, state, step_fn, batches, shardings=shardings, meta=meta, ...)

It does not know the objective: the recipe hands it a step function, a batch iterator and an
evaluation callable.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from jaxllm.data.pipeline import to_global_batch
from jaxllm.errors import RunError
from jaxllm.training import metrics as metrics_lib


class NonFiniteError(RunError):
    pass


def fit(run, state, step_fn, batches: Iterator[dict], *, shardings, meta: dict,
        data_iter=None, evaluate: Callable | None = None, frozen=None,
        flops_per_token: float = 0.0, resumed_from: int | None = None) -> dict:
    """Run `step_fn` until train.steps. `batches` yields this process's rows; `data_iter` is
    the grain iterator checkpointed with the state (None: data position is not saved);
    `evaluate(state) -> dict` runs at train.eval_every and at the end."""
    cfg, t = run.cfg, run.cfg.train
    ckpt, writer = run.checkpointer, run.writer
    step = int(state.step)
    if step >= t.steps:
        return _finished(run, state, step, resumed_from)
    peak, peak_source = metrics_lib.peak_flops(jnp.dtype(cfg.model.compute_dtype))
    peak_total = peak * (len(run.mesh.devices.flat) if peak_source.startswith("datasheet") else
                         jax.process_count())
    run.log(f"training {t.steps - step} steps from step {step}; MFU against {peak_source} "
            f"peak {peak / 1e9:,.0f} GFLOP/s per {'device' if peak_source.startswith('datasheet') else 'host'}")
    run.log_host_alloc()
    if cfg.model.remat != "none" and not cfg.model.scan_layers and jax.default_backend() == "cpu":
        # measured (jaxllm plan, tiny with 4 layers, B 8 x T 256): remat=full scanned 149 -> 43 MiB
        # of temporaries, unrolled 149 -> 143: XLA CPU schedules the recomputation early
        run.log(f"note: model.remat={cfg.model.remat} with model.scan_layers=false saves almost no memory on "
                "CPU (XLA schedules the recomputation early); model.scan_layers=true makes remat effective")
    if cfg.model.matmul == "blas" and cfg.model.attention == "blockwise":
        run.log("note: model.matmul=blas runs attention as its fused CPU kernel (64-query blocks); "
                "model.attention_block applies to XLA's blockwise path only")
    progress = None
    if t.progress and run.is_main:
        from tqdm import tqdm
        progress = tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True)

    history, eval_history = [], []
    preempted = False
    prev_metrics = None
    t_last, steps_since, real_since, padded_since = time.perf_counter(), 0, 0, 0
    run.guard.start(ckpt, step)
    try:
        while step < t.steps:
            local = next(batches)
            batch = to_global_batch(local, shardings.batch.mesh, shardings.batch.spec)
            state, metrics = step_fn(state, batch, frozen)
            step += 1
            steps_since += 1
            if "segment_ids" in batch:
                padded_since += batch["segment_ids"].size
                real_since = real_since + metrics["real_tokens"]   # stays on device: no sync
            # Read the previous step's skip counter while this one runs: one step of
            # pipelining instead of a host sync per step.
            if prev_metrics is not None:
                _check_skips(prev_metrics, step - 1, cfg, ckpt)
            prev_metrics = metrics
            if step % t.log_every == 0 or step == t.steps or step == 1:
                _check_skips(metrics, step, cfg, ckpt)
                m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "real_tokens"}
                dt = time.perf_counter() - t_last
                real = float(real_since) if padded_since else 0.0
                if padded_since:
                    m.update(tokens_per_s=real / dt, padded_tokens_per_s=padded_since / dt,
                             mfu=real / dt * flops_per_token / peak_total, mfu_peak_source=peak_source)
                t_last, steps_since, real_since, padded_since = time.perf_counter(), 0, 0, 0
                history.append(dict(step=step, **{k: v for k, v in m.items() if k != "mfu_peak_source"}))
                writer.write(step, m)
                run.lock.heartbeat()
                if progress is not None:
                    progress.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m.get('tokens_per_s', 0):,.0f}")
            if evaluate is not None and t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                e = evaluate(state)
                eval_history.append(dict(step=step, **e))
                writer.write(step, e)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            ckpt.save(step, state, data_iter, meta)
            if progress is not None:
                progress.update(1)
            # multi-host: JAX's preemption sync point is asked every step (it only fires at the
            # agreed step); exchanging the hosts' own signal flags is a collective, so only at
            # log boundaries
            if run.guard.should_stop(ckpt, step, agree=step % t.log_every == 0):
                preempted = True
                run.log(f"stop requested: saving step {step} and exiting")
                break
        if prev_metrics is not None:
            _check_skips(prev_metrics, step, cfg, ckpt)
        ckpt.save(step, state, data_iter, meta, force=True)
    finally:
        if progress is not None:
            progress.close()

    losses = [h["loss"] for h in history]
    return {"run_dir": str(run.dir), "steps": step, "preempted": preempted,
            "resumed_from": resumed_from, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "eval": eval_history[-1] if eval_history else None,
            "history": history, "state": state}


def _finished(run, state, step: int, resumed_from) -> dict:
    """A rerun of a finished run: say so and summarise it from its metrics."""
    rows = [r for r in metrics_lib.read_metrics(run.dir) if "loss" in r] \
        if (run.dir / "metrics.jsonl").exists() else []
    evals = [r for r in metrics_lib.read_metrics(run.dir) if "eval_loss" in r] if rows else []
    run.log(f"{run.dir} already finished at step {step} (train.steps={run.cfg.train.steps}); "
            f"nothing to do. Raise train.steps to continue it.")
    return {"run_dir": str(run.dir), "steps": step, "preempted": False, "resumed_from": resumed_from,
            "already_finished": True,
            "first_loss": rows[0]["loss"] if rows else None,
            "final_loss": rows[-1]["loss"] if rows else None,
            "eval": evals[-1] if evals else None, "history": rows, "state": state}


def _check_skips(metrics, step: int, cfg, ckpt) -> None:
    skipped = int(metrics["skipped_in_a_row"])
    if skipped >= cfg.optim.max_nonfinite_skips:
        last = ckpt.latest_step() if ckpt is not None else None
        where = (f"the last checkpoint (step {last}) holds finite parameters" if last is not None
                 else "no checkpoint was written")
        raise NonFiniteError(
            f"{skipped} consecutive non-finite losses/gradients/updates (updates skipped) up to step "
            f"{step}; stopping (optim.max_nonfinite_skips={cfg.optim.max_nonfinite_skips}); {where}. "
            f"Lower optim.lr or check the data.")
