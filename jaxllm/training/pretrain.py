"""Recipe: pretraining (causal LM, or MLM) of the full model on packed documents.

    summary = train(cfg)                  # what `jaxllm train` runs for objective clm / mlm
    summary = train(cfg, batches=my_iter)  # your own (B_local, T) batches instead of cfg.data

A recipe only chooses the data, the objective and what is trainable; run setup (training/run.py)
and the loop (training/loop.py) are shared with every other recipe.
"""
from __future__ import annotations

import math
import pathlib
import sys
from typing import Iterator

import jax

from jaxllm.config import Config
from jaxllm.configlib import ConfigError
from jaxllm.data.pipeline import closing_batches, to_global_batch
from jaxllm.model import quant
from jaxllm.model.api import init_params, param_logical_axes, param_shapes
from jaxllm.objectives import make_objective
from jaxllm.parallel import rules as R
from jaxllm.training import metrics as metrics_lib
from jaxllm.training.checkpoint import check_base, params_checksum, source_step
from jaxllm.training.loop import fit
from jaxllm.training.optim import lr_schedule, make_optimizer, skip_metrics
from jaxllm.training.run import Run
from jaxllm.training.step import make_eval_step, make_train_step


def data_iterators(cfg: Config):
    """(train iterator, eval-iterator factory, tokenizer) of this process's rows.
    Opening the eval data here, at start-up, makes its errors appear before any training."""
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
    if not t.eval_every:
        if cfg.data.eval_sources:
            print("note: train.eval_every=0, so data.eval_sources are not read (no held-out evaluation)",
                  file=sys.stderr)
        return train_it, None, tok
    if not cfg.data.eval_sources:
        print("note: data.eval_sources is empty, so there is no held-out evaluation "
              "(train.eval_every is ignored)", file=sys.stderr)
        return train_it, None, tok
    make_eval().close()   # open (and count) the held-out data now: its errors surface at start-up
    return train_it, make_eval, tok


def evaluate(eval_step, params, make_eval, batch_sharding, frozen=None) -> dict:
    """Token-weighted held-out loss, perplexity (z-loss excluded) and accuracy."""
    sums: dict = {}
    with closing_batches(make_eval()) as batches:
        for batch in batches:
            out = jax.device_get(eval_step(params, to_global_batch(batch, batch_sharding.mesh,
                                                                   batch_sharding.spec), frozen))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    w = max(sums.get("weight", 0.0), 1.0)
    loss = sums.get("nll", sums.get("loss", float("nan"))) / w
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
            "eval_accuracy": sums.get("accuracy", 0.0) / w}


def check_objective(cfg: Config, log) -> None:
    t = cfg.train
    if t.objective == "sft":
        if cfg.data.kind != "chat":
            raise ConfigError(f"train.objective=sft reads conversations: set data.kind=chat "
                              f"(got data.kind={cfg.data.kind})")
        if not cfg.checkpoint.init_from:
            log("note: SFT from a random init (checkpoint.init_from is empty)")
    elif cfg.data.kind == "chat":
        raise ConfigError(f"data.kind=chat trains the assistant turns: set train.objective=sft "
                          f"(got {t.objective})")


def _delta(cfg: Config, tokenizer=None):
    """(module, its config) of the trainable delta, or None for full training. The config's
    trainable_tokens are resolved to ids with the run's tokenizer."""
    from jaxllm.model import tokens
    if cfg.lora.r:
        from jaxllm.model import lora
        module, dcfg, field = lora, cfg.lora, "lora.trainable_tokens"
    elif cfg.adapter.size:
        from jaxllm.model import adapter
        module, dcfg, field = adapter, cfg.adapter, "adapter.trainable_tokens"
    else:
        return None
    return module, tokens.resolved(dcfg, tokenizer, field)


def _delta_meta(delta, init_from: str) -> dict | None:
    """What a delta run's checkpoint records to rebuild it (training/checkpoint.py load_policy)."""
    if delta is None:
        return None
    module, dcfg = delta
    return {"kind": module.__name__.rsplit(".", 1)[-1], "base": init_from,
            "token_ids": list(dcfg.trainable_tokens)}


def frozen_layout(cfg: Config, base_specs, base_shapes):
    """(logical specs, shapes) of the frozen base as the step sees it: the base's, or with
    lora.quantize_base its quantized layer matrices (model/quant.py)."""
    q = cfg.lora
    if q.quantize_base == "none":
        return base_specs, base_shapes
    try:
        shapes = jax.eval_shape(lambda p: quant.quantize_tree(p, q.quantize_base, q.quantize_block), base_shapes)
    except ValueError as e:
        raise ConfigError(f"lora.quantize_base={q.quantize_base}: {e}") from None
    return quant.logical_axes(base_specs, shapes), shapes


def load_frozen_base(run, base_specs, base_shapes, frozen_shardings, meta: dict):
    """checkpoint.init_from's params as the frozen base, placed in the step's frozen shardings;
    quantized on the devices (from the base's own shardings) when lora.quantize_base is set.

    meta["base"] records which model that is (absolute path, step, checksum), so a resumed run,
    generation and export rebuild the same base, or refuse in one line if it has changed;
    a fresh run (or one from before this record) writes it."""
    q = run.cfg.lora
    quantized = q.quantize_base != "none"
    shardings = R.param_shardings(base_specs, base_shapes, run.rules, run.mesh) if quantized else frozen_shardings
    ident = meta.get("base")
    path = ident["path"] if ident else str(pathlib.Path(run.cfg.checkpoint.init_from).absolute())
    step = ident.get("step") if ident else source_step(path)
    full = run.load_init_from(jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), base_shapes, shardings), path, step)
    if ident:
        check_base(ident, full, str(run.dir))
    else:   # a fresh run, or one from before this record: recorded from now on, said once
        meta["base"] = {"path": path, "step": step, "checksum": params_checksum(full)}
        run.log(f"frozen base: {path}" + (f" step {step}" if step is not None else "")
                + " (path, step and params checksum recorded: a changed base is refused later)")
    if not quantized:
        return full
    base = jax.jit(lambda p: quant.quantize_tree(p, q.quantize_base, q.quantize_block),
                   out_shardings=frozen_shardings)(full)
    smaller = {p: b for p, b in quant.block_sizes(base).items() if b != q.quantize_block}
    mib = 2 ** 20
    run.log(f"quantized the frozen base's layer matrices to {q.quantize_base} (block {q.quantize_block}"
            + "".join(f"; {b} in {p}, whose blocked dim is not a multiple" for p, b in smaller.items())
            + f"): {quant.tree_nbytes(full) / mib:.1f} -> {quant.tree_nbytes(base) / mib:.1f} MiB of params")
    return base


def train(cfg: Config, batches: Iterator[dict] | None = None) -> dict:
    """Pretraining (clm/mlm) or SFT; full parameters, or a LoRA/adapter delta over a frozen
    base read from checkpoint.init_from (the base is the step's frozen argument)."""
    t = cfg.train
    if (cfg.lora.r or cfg.adapter.size) and not cfg.checkpoint.init_from:
        raise ConfigError(f"{'lora.r' if cfg.lora.r else 'adapter.size'} trains a delta over a frozen "
                          f"base: set checkpoint.init_from to a run dir, checkpoint or HF directory")
    with Run(cfg) as run:
        check_objective(cfg, run.log)
        run.check_layout()
        train_it, make_eval, tokenizer = data_iterators(cfg)
        delta = _delta(cfg, tokenizer)
        chat_template = None    # SFT on chat data: sample prompts are user turns in its template
        if t.sample_prompts and tokenizer is not None:
            from jaxllm.evaluation.samples import check_sample_prompts
            if cfg.data.kind == "chat":
                from jaxllm.data.chat import load_template
                chat_template = load_template(cfg.data.chat_template, tokenizer)
            check_sample_prompts(cfg.model, tokenizer, t.sample_prompts, t.sample_tokens, chat_template)
        if batches is not None:
            run.log("training on the batches passed to train(); cfg.data's iterator position is "
                    "not checkpointed")
        loss_fn = make_objective(t.objective, cfg.model, t, tokenizer)
        base_specs, base_shapes = param_logical_axes(cfg.model), param_shapes(cfg.model)
        if delta is None:
            init_fn, specs, merge, frozen_kw, meta = (lambda k: init_params(cfg.model, k)), base_specs, None, {}, {}
        else:
            module, dcfg = delta
            init_fn = lambda k: module.init_delta(base_shapes, dcfg, k)   # noqa: E731
            specs, merge = module.delta_logical_axes(cfg.model, dcfg), module.make_merge(dcfg)
            frozen_specs, frozen_shapes = frozen_layout(cfg, base_specs, base_shapes)
            frozen_kw = dict(frozen_specs=frozen_specs, frozen_shapes=frozen_shapes, init_from_trainable=False)
            meta = {"delta": _delta_meta(delta, cfg.checkpoint.init_from)}
        state, shardings, optimizer, meta, resumed = run.start_state(
            init_fn=init_fn, param_specs=specs, meta=meta,
            make_optimizer=lambda horizon: make_optimizer(cfg.optim, horizon),
            data_iter=None if batches is not None else train_it, **frozen_kw)
        base = None
        if delta is not None:
            base = load_frozen_base(run, base_specs, base_shapes, shardings.frozen, meta)
        merge_kw = {} if merge is None else {"merge": merge}
        step_fn = make_train_step(loss_fn, optimizer, shardings, microbatches=t.microbatches,
                                  optimizer_metrics=skip_metrics(lr_schedule(cfg.optim, meta["schedule_steps"])),
                                  **merge_kw, **run.step_options())
        eval_step = make_eval_step(loss_fn, shardings=shardings, **merge_kw)


        def evaluate_and_sample(s):
            out = {} if make_eval is None else evaluate(eval_step, s.params, make_eval, shardings.batch, base)
            if t.sample_prompts and tokenizer is not None:
                from jaxllm.evaluation.samples import sample_completions
                policy = s.params if merge is None else merge(s.params, base)
                run.writer.write_samples(int(s.step), sample_completions(
                    policy, cfg.model, tokenizer, t.sample_prompts, t.sample_tokens, jax.random.key(t.seed),
                    chat_template=chat_template))
            return out
        summary = fit(run, state, step_fn, batches if batches is not None else train_it,
                      shardings=shardings, meta=meta, frozen=base,
                      data_iter=None if batches is not None else train_it,
                      evaluate=None if make_eval is None and not t.sample_prompts else evaluate_and_sample,
                      flops_per_token=metrics_lib.flops_per_token(cfg.model, t.seq_len),
                      resumed_from=resumed)
        if cfg.lora.r and run.is_main:
            from jaxllm.interop.peft import save_peft
            save_peft(run.dir / "adapter", cfg.model, jax.device_get(summary["state"].params), delta[1],
                      base_model_name_or_path=meta["base"]["path"],   # absolute: usable from any cwd
                      base=base if delta[1].trainable_tokens else None)
            run.log(f"wrote the LoRA adapter in PEFT format to {run.dir / 'adapter'}")
        summary["frozen"] = base
        return summary
