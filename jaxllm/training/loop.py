"""The training loop: config -> mesh, data, state, the one step -> run directory.

    summary = jaxllm.train(cfg)

Reads top to bottom as the algorithm; everything it calls lives in its own module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import configlib
from jaxllm.config import Config
from jaxllm.configlib import ConfigError
from jaxllm.data.pipeline import to_global_batch
from jaxllm.model.api import init_params, param_logical_axes
from jaxllm.objectives import make_objective
from jaxllm.parallel import distributed
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules as rules_lib
from jaxllm.training import metrics as metrics_lib
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.checkpoint import Checkpointer, load_params
from jaxllm.training.preemption import PreemptionGuard
from jaxllm.training.setup import init_state
from jaxllm.training.step import make_eval_step, make_train_step


class NonFiniteError(RuntimeError):
    pass


def _data_iterators(cfg: Config, mesh):
    """(train iterator, eval-iterator factory) of LOCAL rows; global batch via the mesh."""
    t = cfg.train
    if cfg.data.kind == "synthetic_tokens":
        from jaxllm.data.tokens import synthetic_batches

        def make(split, n=None):
            return synthetic_batches(seq_len=t.seq_len, global_batch_size=t.batch_size,
                                     vocab_size=cfg.model.vocab_size, seed=cfg.data.seed,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(), split=split, num_batches=n)
        # the synthetic stream is endless: 0 ("the whole held-out set") means the default 4
        return make("train"), lambda: make("eval", t.eval_batches or 4), None
    from jaxllm.data import pipeline
    tok = pipeline.load_tokenizer_for(cfg.data, cfg.model.vocab_size)
    train_it = pipeline.make_train_iterator(cfg.data, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                            seed=cfg.data.seed, tokenizer=tok)

    def make_eval():
        # train.eval_batches=0: the data config decides (data.eval_batches; 0 = the whole set)
        return pipeline.make_eval_iterator(cfg.data, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                           seed=cfg.data.seed, tokenizer=tok,
                                           num_batches=t.eval_batches or None)
    return train_it, make_eval, tok


def _global(batch: dict, sharding) -> dict:
    """This process's rows -> global arrays; checks process p's rows land at [p*b, (p+1)*b)."""
    return to_global_batch(batch, sharding.mesh, sharding.spec)


def evaluate(eval_step, params, make_eval, sharding) -> dict:
    sums: dict = {}
    for batch in make_eval():
        out = jax.device_get(eval_step(params, _global(batch, sharding), None))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    w = max(sums.get("weight", 0.0), 1.0)
    loss = sums.get("nll", sums.get("loss", float("nan"))) / w   # perplexity excludes z-loss
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
            "eval_accuracy": sums.get("accuracy", 0.0) / w}


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
    """On resume, drop rows the killed run logged after its last checkpoint: the resumed run
    logs them again, so metrics.jsonl reads as one uninterrupted run."""
    if not path.exists() or jax.process_index() != 0:
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError):  # a line torn by the kill
            continue
    path.write_text("".join(line + "\n" for line in keep))


def _check_layout(cfg: Config, mesh) -> None:
    per_micro = cfg.train.batch_size // cfg.train.microbatches
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if per_micro % shards:
        raise ConfigError(f"train.batch_size / train.microbatches = {per_micro} rows per microbatch "
                          f"must be divisible by mesh data*fsdp = {shards}")


def _init_from(cfg: Config, state, shardings):
    """Params of another run / checkpoint / HF model, checked against this run's model."""
    params, src_model = load_params(cfg.checkpoint.init_from, shardings.state.params)
    if src_model:
        ignore = {"param_dtype", "compute_dtype", "remat", "attention", "max_seq_len", "init_std"}
        ours = dataclasses.asdict(cfg.model)
        diffs = [f"{k}: {src_model[k]!r} there vs {ours[k]!r} here" for k in ours
                 if k not in ignore and k in src_model
                 and (tuple(src_model[k]) if isinstance(src_model[k], list) else src_model[k]) != ours[k]]
        if diffs:
            raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} has another model: "
                              + "; ".join(diffs) + " (set model.* to match)")
    # master weights keep this run's param dtype (an HF bf16 file must not make bf16 masters)
    params = jax.tree.map(lambda p, ref: p.astype(ref.dtype), params, state.params)
    return state.replace(params=params)


def train(cfg: Config) -> dict:
    distributed.initialize(cfg.distributed)   # before any backend use; no-op on one host
    t = cfg.train
    run_dir = pathlib.Path(t.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not cfg.checkpoint.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ConfigError(f"{ckpt_dir} already holds checkpoints and checkpoint.resume=false: "
                          f"use a new train.run_dir (or resume=true to continue that run)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        configlib.dump_yaml(cfg, run_dir / "config.yaml")

    # Single-device debug mode: one device, NaNs raise where they appear, optionally eager.
    devices = jax.devices()[:1] if t.debug else jax.devices()[:cfg.mesh.devices or None]
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    _check_layout(cfg, mesh)
    rules = rules_lib.logical_rules(cfg.mesh)
    optimizer = make_optimizer(cfg.optim, t.steps)
    schedule = lr_schedule(cfg.optim, t.steps)
    debug = contextlib.ExitStack()
    if t.debug:
        debug.enter_context(jax.debug_nans(True))
        if t.disable_jit:
            debug.enter_context(jax.disable_jit())

    with debug, jax.set_mesh(mesh), nn.logical_axis_rules(rules), PreemptionGuard() as guard:
        train_it, make_eval, tokenizer = _data_iterators(cfg, mesh)
        loss_fn = make_objective(t.objective, cfg.model, t, tokenizer)
        state, shardings = init_state(lambda k: init_params(cfg.model, k),
                                      param_logical_axes(cfg.model), optimizer, rules, mesh, t.seed)
        step_fn = make_train_step(loss_fn, optimizer, shardings, microbatches=t.microbatches,
                                  lr_fn=schedule)
        eval_fn = make_eval_step(loss_fn, shardings=shardings)

        # Resume from this run's latest complete checkpoint, else maybe start from other params.
        ckpt = Checkpointer(ckpt_dir, cfg.checkpoint)
        meta = {"model": dataclasses.asdict(cfg.model)}
        resumed_from = None
        if cfg.checkpoint.resume and ckpt.latest_step() is not None:
            state, saved_meta = ckpt.restore(state, train_it)
            meta.update({k: v for k, v in saved_meta.items() if k != "model"})
            resumed_from = int(state.step)
            _truncate_metrics(run_dir / "metrics.jsonl", resumed_from)
        elif cfg.checkpoint.init_from:
            state = _init_from(cfg, state, shardings)

        writer = metrics_lib.MetricsWriter(
            run_dir, purge_step=None if resumed_from is None else resumed_from + 1)
        peak = metrics_lib.measure_peak_flops(jnp.dtype(cfg.model.compute_dtype))
        flops_tok = metrics_lib.flops_per_token(cfg.model, t.seq_len)
        tokens_per_step = t.batch_size * t.seq_len
        step = int(state.step)
        progress = None
        if t.progress and jax.process_index() == 0:
            from tqdm import tqdm
            progress = tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True)

        history, eval_history = [], []
        preempted = False
        prev_metrics = None
        t_last, steps_since = time.perf_counter(), 0
        try:
            while step < t.steps:
                batch = _global(next(train_it), shardings.batch)
                state, metrics = step_fn(state, batch, None)
                step += 1
                steps_since += 1
                # Read the previous step's skip counter while this one runs: one step of
                # pipelining instead of a host sync per step.
                if prev_metrics is not None:
                    _check_skips(prev_metrics, step - 1, cfg)
                prev_metrics = metrics
                if step % t.log_every == 0 or step == t.steps or step == 1:
                    _check_skips(metrics, step, cfg)
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    dt = time.perf_counter() - t_last
                    tps = steps_since * tokens_per_step / dt
                    m.update(tokens_per_s=tps, mfu=tps * flops_tok / peak)
                    t_last, steps_since = time.perf_counter(), 0
                    history.append(dict(step=step, **m))
                    writer.write(step, m)
                    if progress is not None:
                        progress.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}")
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    e = evaluate(eval_fn, state.params, make_eval, shardings.batch)
                    eval_history.append(dict(step=step, **e))
                    writer.write(step, e)
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                ckpt.save(step, state, train_it, meta)
                if progress is not None:
                    progress.update(1)
                # multi-host: agreeing on a stop is a collective, so only at log boundaries
                if (jax.process_count() == 1 or step % t.log_every == 0) and guard.should_stop(ckpt, step):
                    preempted = True
                    break
            if prev_metrics is not None:
                _check_skips(prev_metrics, step, cfg)
            ckpt.save(step, state, train_it, meta, force=True)
        finally:
            ckpt.wait()
            ckpt.close()
            if progress is not None:
                progress.close()
            writer.close()

    losses = [h["loss"] for h in history]
    return {"run_dir": str(run_dir), "steps": step, "preempted": preempted,
            "resumed_from": resumed_from, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "eval": eval_history[-1] if eval_history else None,
            "history": history, "state": state}


def _check_skips(metrics, step: int, cfg: Config) -> None:
    skipped = int(metrics["skipped_in_a_row"])
    if skipped >= cfg.optim.max_nonfinite_skips:
        raise NonFiniteError(
            f"{skipped} consecutive non-finite losses/gradients (updates skipped) up to step "
            f"{step}; stopping (optim.max_nonfinite_skips={cfg.optim.max_nonfinite_skips}). "
            f"The last checkpoint holds finite parameters.")
