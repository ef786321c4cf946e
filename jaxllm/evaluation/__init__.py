"""Using a trained model: generation from the command line, chat, held-out perplexity, and an
lm-evaluation-harness adapter for standard benchmarks.

    source.py          a run dir / checkpoint dir / HF dir -> (model config, params, tokenizer)
    perplexity.py      token-weighted perplexity of files through the data pipeline
    samples.py         a few completions for the training loop to log at eval time
    lm_eval_adapter.py `lm_eval.api.model.LM` subclass (the optional `eval` extra)
    chat.py            the interactive `jaxllm chat` loop
    cli.py             `jaxllm generate`, `jaxllm chat`, `jaxllm eval`

Decoding itself is jaxllm.model.generate.
"""
