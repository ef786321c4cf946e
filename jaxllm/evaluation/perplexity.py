"""Held-out perplexity of text files, measured the way training's eval measures it.

The files go through the same grain pipeline as training data (make_eval_iterator: tokenize,
bos/eos around each document, pack into (B, T) rows, every document read once) and the loss
is the CLM objective's: next-token cross-entropy summed over the targets of each document (a
document's first token is not predicted from the previous document) and divided by their
count. So `jaxllm eval --data` on a run's eval files reports that run's eval_loss/eval_ppl when
the rows are as long as the run's were (train.seq_len, what --seq-len defaults to for a run dir
or its checkpoints/); at another length long documents are cut elsewhere, and positions beyond
the trained length are ones the model never learned (a higher loss).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError


def perplexity(params, model_cfg: ModelConfig, batches: Iterable[dict]) -> dict:
    """Token-weighted mean NLL over batches of tokens/positions/segment_ids/loss_mask.
    -> {"nll", "ppl", "accuracy" (argmax == target), "tokens" (targets counted), "batches"}."""
    from jaxllm.objectives.clm import make_clm_loss
    from jaxllm.training.step import make_eval_step
    eval_step = make_eval_step(make_clm_loss(model_cfg))
    nll = correct = tokens = 0.0
    n = 0
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch))
        nll += float(sums["nll"])
        correct += float(sums["accuracy"])
        tokens += float(sums["weight"])
        n += 1
    if not tokens:
        raise UserError("perplexity: the data holds no token to predict (empty documents?)")
    mean = nll / tokens
    return {"nll": mean, "ppl": math.exp(min(mean, 700.0)), "accuracy": correct / tokens,
            "tokens": int(tokens), "batches": n}


def file_perplexity(params, model_cfg: ModelConfig, tokenizer, files: Sequence[str], *, seq_len: int,
                    batch_size: int, text_field: str = "text") -> dict:
    """perplexity() of documents in `files` (JSONL / Parquet / text / ArrayRecord, globs allowed),
    packed into rows of seq_len tokens, batch_size rows at a time. bos/eos wrap each document
    when the tokenizer has them (as data.add_bos/add_eos do in training)."""
    from jaxllm.data.config import DataConfig
    from jaxllm.data.pipeline import make_eval_iterator
    if seq_len < 2 or batch_size < 1:
        raise UserError(f"eval: --seq-len must be >= 2 and --batch-size >= 1, got {seq_len}, {batch_size}")
    if seq_len > model_cfg.max_seq_len:
        raise UserError(f"eval: --seq-len {seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    if not files:
        raise UserError("eval: no data files given (--data FILE [FILE ...])")
    sources = [{"path": f, "text_field": text_field} for f in files]
    try:
        cfg = DataConfig(kind="text", sources=sources, eval_sources=sources, shuffle=False,
                         add_bos=tokenizer.bos_id is not None, add_eos=tokenizer.eos_id is not None,
                         num_shards=1)
    except ValueError as e:
        raise UserError(f"eval: {e}") from None
    it = make_eval_iterator(cfg, seq_len=seq_len, global_batch_size=batch_size, seed=0, process_index=0,
                            process_count=1, tokenizer=tokenizer)
    try:
        return perplexity(params, model_cfg, it)
    finally:
        it.close()
