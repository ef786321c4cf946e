"""Recipe: DPO (train.objective=dpo) on ranked or paired responses, offline: no sampling, no
reward model. The policy is the full model (the reference is then a frozen copy of its start,
the step's frozen argument) or a LoRA/adapter delta over a frozen base (the reference is the
base with the delta switched off: no second copy). Data: the reward model's rankings
(data/preference.py, reward.k_max responses per prompt, best first); beta is rl.dpo_beta.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import Config
from jaxllm.configlib import ConfigError
from jaxllm.data.pipeline import closing_batches, to_global_batch
from jaxllm.model.api import init_params, param_logical_axes, param_shapes
from jaxllm.objectives.dpo import make_dpo_loss
from jaxllm.training import metrics as metrics_lib
from jaxllm.training.loop import fit
from jaxllm.training.optim import lr_schedule, make_optimizer, skip_metrics
from jaxllm.training.pretrain import _delta, _delta_meta, frozen_layout, load_frozen_base
from jaxllm.training.reward import data_iterators
from jaxllm.training.run import Run
from jaxllm.training.step import make_eval_step, make_train_step


def evaluate(eval_step, params, make_eval, batch_sharding, frozen) -> dict:
    """Held-out pair-weighted DPO loss, pairwise accuracy of the implicit reward, its margin."""
    totals = None
    with closing_batches(make_eval()) as batches:
        for batch in batches:
            out = eval_step(params, to_global_batch(batch, batch_sharding.mesh, batch_sharding.spec), frozen)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    s = {k: float(v) for k, v in jax.device_get(totals).items()}
    w = max(s["weight"], 1.0)
    return {"eval_loss": s["loss"] / w, "eval_accuracy": s["accuracy"] / w, "eval_margin": s["margin"] / w}


def train(cfg: Config) -> dict:
    t = cfg.train
    if cfg.data.kind != "chat":
        raise ConfigError("train.objective=dpo reads rankings rendered as chats: set data.kind=chat")
    if not cfg.checkpoint.init_from:
        raise ConfigError("DPO starts from a policy (an SFT run): set checkpoint.init_from")
    with Run(cfg) as run:
        run.check_layout()
        train_it, make_eval, tokenizer = data_iterators(cfg, run.log)
        delta = _delta(cfg, tokenizer)
        loss_fn = make_dpo_loss(cfg.model, beta=cfg.rl.dpo_beta, rpo_alpha=cfg.rl.dpo_rpo_alpha)
        base_specs, base_shapes = param_logical_axes(cfg.model), param_shapes(cfg.model)
        if delta is None:
            def init_fn(k):
                return init_params(cfg.model, k)
            specs = base_specs

            def merge(trainable, frozen):
                return {**trainable, "reference": frozen}
        else:
            module, dcfg = delta

            def init_fn(k):
                return module.init_delta(base_shapes, dcfg, k)
            specs, merge = module.delta_logical_axes(cfg.model, dcfg), module.make_merge(dcfg)
        state, shardings, optimizer, meta, resumed = run.start_state(
            init_fn=init_fn, param_specs=specs, make_optimizer=lambda h: make_optimizer(cfg.optim, h),
            meta={"delta": _delta_meta(delta, cfg.checkpoint.init_from)},
            data_iter=train_it, init_from_trainable=False,
            **dict(zip(("frozen_specs", "frozen_shapes"), frozen_layout(cfg, base_specs, base_shapes))))
        frozen = load_frozen_base(run, base_specs, base_shapes, shardings.frozen, meta)   # QLoRA: quantized
        if delta is None and resumed is None:   # the policy starts as the reference
            state = state.replace(params=jax.tree.map(jnp.copy, frozen))
        step_fn = make_train_step(loss_fn, optimizer, shardings, microbatches=t.microbatches, merge=merge,
                                  optimizer_metrics=skip_metrics(lr_schedule(cfg.optim, meta["schedule_steps"])),
                                  **run.step_options())
        eval_step = make_eval_step(loss_fn, merge=merge, shardings=shardings)
        summary = fit(run, state, step_fn, train_it, shardings=shardings, meta=meta, data_iter=train_it,
                      frozen=frozen, resumed_from=resumed,
                      evaluate=None if make_eval is None else
                      (lambda s: evaluate(eval_step, s.params, make_eval, shardings.batch, frozen)),
                      flops_per_token=3 * metrics_lib.flops_per_token(cfg.model, t.seq_len, training=False)
                      + metrics_lib.flops_per_token(cfg.model, t.seq_len))
        summary["frozen"] = frozen      # the reference / the base the delta adapts, as the recipes return it
        return summary
