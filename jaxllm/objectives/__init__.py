"""One small pure loss function per objective.

Every objective is `loss_fn(params, batch, rng) -> (loss_sum, metrics)` where `metrics` holds
sums, including `weight` (how many targets/pairs/tokens the sum is over). The train step adds
sums over microbatches and divides by the total weight, so the loss is exactly the
token-weighted (or pair-weighted) mean however the batch is split.
"""
from jaxllm.configlib import ConfigError
from jaxllm.objectives.clm import make_clm_loss, masked_cross_entropy, target_weights  # noqa: F401
from jaxllm.objectives.mlm import make_mlm_loss  # noqa: F401
from jaxllm.objectives.sft import make_sft_loss  # noqa: F401


def _mlm_from_config(model_cfg, train_cfg, tokenizer):
    mask_id = train_cfg.mlm_mask_id
    if mask_id < 0:
        mask_id = getattr(tokenizer, "mask_id", None)
        if mask_id is None:
            where = ("this tokenizer has no <mask> piece (retrain it with `jaxllm tokenizer train`)"
                     if tokenizer is not None else "this data has no tokenizer")
            raise ConfigError(f"train.objective=mlm needs a mask token: {where}; "
                              "or set train.mlm_mask_id explicitly")
    special, real_vocab = (), None
    if tokenizer is not None:
        # HF tokenizers may lack some of these (Qwen2 has no bos): None is not an id
        special = [i for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id,
                               *tokenizer.special_ids.values()) if i is not None]
        real_vocab = tokenizer.vocab_size
    return make_mlm_loss(model_cfg, mask_id=mask_id, mask_prob=train_cfg.mlm_prob,
                         z_loss=train_cfg.z_loss, special_ids=special, real_vocab_size=real_vocab)


def make_objective(name: str, model_cfg, train_cfg, tokenizer=None):
    if name == "clm":
        return make_clm_loss(model_cfg, z_loss=train_cfg.z_loss)
    if name == "mlm":
        return _mlm_from_config(model_cfg, train_cfg, tokenizer)
    if name == "sft":
        return make_sft_loss(model_cfg, z_loss=train_cfg.z_loss, normalize=train_cfg.sft_normalize)
    raise ConfigError(f"unknown objective '{name}'; valid: clm, mlm, sft")
