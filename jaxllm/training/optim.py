"""AdamW with linear warmup + cosine decay and global-norm clipping (optax), wrapped so that a
non-finite step is skipped and counted.

Why our own skip wrapper rather than optax.apply_if_finite: that one checks the gradients
only, so a non-finite *update* (optim.lr=nan, an overflow inside the optimizer) is applied
and poisons the parameters; and its counters are internal fields the step would have to
probe. `SkipState` is the explicit interface the step and the loop read.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    decay = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay, end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices only: not on norm scales or biases (whatever their ndim,
    since stacked layers add a leading axis)."""
    def keep(path, _):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return not any(n in ("scale", "bias") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


class SkipState(NamedTuple):
    inner: Any                 # the wrapped optimizer's state (unchanged by a skipped step)
    applied: jax.Array         # int32: updates applied so far (the schedule's position)
    skipped: jax.Array         # int32: updates skipped so far
    skipped_in_a_row: jax.Array


def _norm_is_finite(tree) -> jax.Array:
    """Whether the tree's global L2 norm is finite: False for any NaN/Inf element, and for
    finite values so large that their squares overflow (which no update should apply either).
    For the gradients: the step computes their norm anyway (clipping, the grad_norm metric) and
    XLA shares it, where per-leaf isfinite checks cost CPU kernels of their own at compile time."""
    return jnp.isfinite(optax.tree.norm(tree))


def _all_finite(tree) -> jax.Array:
    """Per leaf. For the updates: their norm instead raised the 125m step's peak temp memory by
    270 MiB (tests/test_memory.py)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(inner: optax.GradientTransformation, moment_dtype: str = "") -> optax.GradientTransformation:
    """Apply `inner` only when its gradients (their norm) AND its updates are finite; otherwise leave the
    parameters and the inner state as they were and count the skip. The new state keeps the
    old state's dtypes (bf16 parameters keep bf16 moments; see README), so `moment_dtype`
    only has to cast the initial state's float arrays (AdamW's mu and nu) once."""
    def init(params):
        state = inner.init(params)
        if moment_dtype:
            dt = jnp.dtype(moment_dtype)
            state = jax.tree.map(lambda x: x.astype(dt) if x.ndim and jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 state)
        # three distinct buffers (the state is donated; one shared buffer would be donated thrice)
        return SkipState(state, *(jnp.zeros((), jnp.int32) for _ in range(3)))

    def update(grads, state: SkipState, params=None):
        updates, new_inner = inner.update(grads, state.inner, params)
        ok = _norm_is_finite(grads) & _all_finite(updates)
        new_inner = jax.tree.map(lambda new, old: jnp.where(ok, new.astype(old.dtype), old),
                                 new_inner, state.inner)
        updates = jax.tree.map(lambda u, g: jnp.where(ok, u, 0).astype(g.dtype), updates, grads)
        bad = (~ok).astype(jnp.int32)
        return updates, SkipState(new_inner, state.applied + 1 - bad, state.skipped + bad,
                                  (state.skipped_in_a_row + bad) * bad)
    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int, *,
                   lr_scales: dict[str, float] | None = None) -> optax.GradientTransformation:
    """lr_scales: top-level parameter subtrees whose updates are multiplied (their learning
    rate is the schedule's times the factor), e.g. RL's zero-initialised value head."""
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    if lr_scales:
        chain.append(_scale_subtrees(lr_scales))
    return skip_nonfinite(optax.chain(*chain), cfg.moment_dtype)


def _scale_subtrees(scales: dict[str, float]) -> optax.GradientTransformation:
    def scale(updates, params=None):
        del params
        missing = set(scales) - set(updates)
        if missing:   # a typo would otherwise leave the rate unscaled without a word
            raise KeyError(f"lr_scales names {sorted(missing)}, which the parameters lack: {sorted(updates)}")
        return {k: jax.tree.map(lambda u, f=scales.get(k, 1.0): u * f, v) for k, v in updates.items()}
    return optax.stateless(scale)


def skip_metrics(schedule: optax.Schedule | None = None):
    """The step's optimizer metrics: (state before, state after) -> skip counters and the lr
    this step used (the schedule advances only on applied updates)."""
    def metrics(before: SkipState, after: SkipState) -> dict:
        out = {"skipped_in_a_row": after.skipped_in_a_row, "skipped_updates": after.skipped}
        if schedule is not None:
            out["lr"] = schedule(before.applied)
        return out
    return metrics
