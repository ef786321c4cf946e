"""One small pure loss function per objective.

Every objective is `loss_fn(params, batch, rng) -> (loss_sum, metrics)` where `metrics` holds
sums, including `weight` (how many targets/pairs/tokens the sum is over). The train step adds
sums over microbatches and divides by the total weight, so the loss is exactly the
token-weighted (or pair-weighted) mean however the batch is split.
"""
from jaxllm.objectives.clm import make_clm_loss, masked_cross_entropy, target_weights  # noqa: F401
from jaxllm.objectives.mlm import make_mlm_loss  # noqa: F401


def make_objective(name: str, model_cfg, train_cfg, tokenizer=None):
    if name == "clm":
        return make_clm_loss(model_cfg, z_loss=train_cfg.z_loss)
    if name == "mlm":
        mask_id = train_cfg.mlm_mask_id
        if mask_id < 0:
            mask_id = getattr(tokenizer, "mask_id", None) if tokenizer is not None else None
            if tokenizer is not None and mask_id is None:
                raise ValueError("MLM needs a <mask> token: this tokenizer has none; set "
                                 "train.mlm_mask_id or retrain with `jaxllm tokenizer train`")
        return make_mlm_loss(model_cfg, mask_prob=train_cfg.mlm_prob,
                             mask_id=None if mask_id is None or mask_id < 0 else mask_id)
    raise ValueError(f"unknown objective '{name}'; valid: clm, mlm")
