"""AdamW with linear warmup + cosine decay and global-norm clipping, all from optax."""
from __future__ import annotations

import jax
import optax

from jaxllm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    decay = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=decay, end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only: not on norm scales or biases (whatever their ndim,
    since scanned layers add a leading axis)."""
    def keep(path, _):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return not any(n in ("scale", "bias") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    # Non-finite gradients skip the update (counted in the state); the loop stops the run
    # after max_nonfinite_skips in a row.
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=10**9)
