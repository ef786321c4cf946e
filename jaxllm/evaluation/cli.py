"""`jaxllm generate`, `jaxllm chat`, `jaxllm eval`: use a model from a run dir, a checkpoint
dir or an HF directory (see evaluation/source.py for how SRC and its tokenizer are found).

    jaxllm generate runs/pretrain-tiny --prompt "Once upon a time" --max-new-tokens 64
    jaxllm generate hf/qwen2.5-0.5b --prompt "2 + 2 =" --temperature 0.7 --top-p 0.9 --seed 1
    jaxllm chat runs/sft-tiny
    jaxllm eval runs/pretrain-tiny --data 'data/synth/pretrain/eval-*.jsonl' --seq-len 128
    jaxllm eval runs/pretrain-tiny --tasks my_task --include-path tasks/ --limit 100   # lm-eval
"""
from __future__ import annotations

import json
import pathlib
import sys

from jaxllm.errors import UserError


def _sampling(p, default_tokens: str, temperature: float, top_p: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"default: {default_tokens}")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=top_p,
                   help="sample from the nucleus of this mass (1 = off; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling key: the same seed gives the same text")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or dir, instead of SRC's own")


def _generate(args) -> None:
    import jax

    from jaxllm.evaluation.source import load_model
    from jaxllm.model.generate import generate_text
    model = load_model(args.src, args.tokenizer)
    n = args.max_new_tokens
    if n is None:   # the default fits the model's window
        bos = model.tokenizer.bos_id is not None
        longest = max(len(model.tokenizer.encode(p, add_bos=bos)) for p in args.prompt)
        n = max(min(128, model.cfg.max_seq_len - longest), 1)
    completions = generate_text(
        model.params, model.cfg, model.tokenizer, args.prompt, max_new_tokens=n,
        key=jax.random.key(args.seed), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.json:
        print(json.dumps([{"prompt": p, "completion": c} for p, c in zip(args.prompt, completions)],
                         ensure_ascii=False))
        return
    for i, c in enumerate(completions):
        print(("\n" if i else "") + c)


def _chat(args) -> None:
    from jaxllm.data.chat import CHATML
    from jaxllm.evaluation.chat import chat_loop
    from jaxllm.evaluation.source import load_model, template_for
    given = args.chat_template
    if given and given != CHATML and not pathlib.Path(given).exists():   # named as the flag, not the config key
        raise UserError(f"chat: --chat-template {given} does not exist; give 'chatml', '' (the tokenizer's own), "
                        f"a Jinja template file or a tokenizer_config.json holding chat_template")
    template = template_for(args.src, given, lambda m: print(m, file=sys.stderr))
    model = load_model(args.src, args.tokenizer)
    n = min(256, model.cfg.max_seq_len // 2) if args.max_new_tokens is None else args.max_new_tokens
    chat_loop(model, template=template, system=args.system, max_new_tokens=n,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _eval(args) -> None:
    from jaxllm.evaluation.source import load_model, run_seq_len
    if not args.data and not args.tasks:
        raise UserError("eval: give --data FILE ... (perplexity) and/or --tasks NAME,... (lm-eval)")
    # before the model and lm_eval load: a bad number is a one-line error, not a traceback later
    if args.batch_size < 1:
        raise UserError(f"eval: --batch-size must be >= 1, got {args.batch_size}")
    if args.seq_len is not None and args.seq_len < 2:
        raise UserError(f"eval: --seq-len must be >= 2, got {args.seq_len}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"eval: --num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not args.limit > 0:   # not >: NaN is refused too
        raise UserError(f"eval: --limit must be > 0 (documents per task, or a fraction < 1), got {args.limit}")
    model = load_model(args.src, args.tokenizer)
    if args.data:
        from jaxllm.evaluation.perplexity import file_perplexity
        seq_len = args.seq_len
        if seq_len is None:   # a run's eval loss is measured at the length it trained at
            seq_len, where = run_seq_len(args.src)
            if seq_len is not None:
                print(f"eval: --seq-len {seq_len} (train.seq_len of {where})", file=sys.stderr)
        seq_len = seq_len or min(model.cfg.max_seq_len, 1024)
        out = file_perplexity(model.params, model.cfg, model.tokenizer, args.data, seq_len=seq_len,
                              batch_size=args.batch_size, text_field=args.text_field)
        print(json.dumps({"src": args.src, "data": args.data, "seq_len": seq_len, **out}))
    if args.tasks:
        from jaxllm.evaluation.lm_eval_adapter import JaxLLM, run_tasks
        lm = JaxLLM(model.params, model.cfg, model.tokenizer, batch_size=args.batch_size,
                    max_length=args.seq_len)
        results = run_tasks(lm, [t for t in args.tasks.split(",") if t], include_path=args.include_path,
                            limit=args.limit, num_fewshot=args.num_fewshot)
        print(json.dumps({"src": args.src, "results": results["results"]}, default=str))


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="continue prompts with a trained or imported model")
    g.add_argument("src", help="run dir, checkpoint dir or HF model dir")
    g.add_argument("--prompt", action="append", required=True,
                   help="text to continue (repeat for a batch); bos is added when the tokenizer has one")
    g.add_argument("--json", action="store_true", help="print [{prompt, completion}, ...] as JSON")
    _sampling(g, "128, or what fits in the model's max_seq_len after the prompt", 0.0, 1.0)
    g.set_defaults(func=_generate)

    c = subparsers.add_parser("chat", help="talk to a chat model in the terminal (answers stream)")
    c.add_argument("src", help="run dir, checkpoint dir or HF model dir")
    c.add_argument("--chat-template", default=None,
                   help="default: the run's data.chat_template; '' (the tokenizer's own, else ChatML), 'chatml', "
                        "or a Jinja file / tokenizer_config.json")
    c.add_argument("--system", default=None, help="a system message to start the conversation with")
    _sampling(c, "256, at most half the model's max_seq_len", 0.7, 0.9)
    c.set_defaults(func=_chat)

    e = subparsers.add_parser("eval", help="held-out perplexity of files, and lm-eval-harness tasks")
    e.add_argument("src", help="run dir, checkpoint dir or HF model dir")
    e.add_argument("--data", nargs="+", default=None, help="text files (JSONL/Parquet/text/ArrayRecord, globs)")
    e.add_argument("--text-field", default="text", help="JSON key / Parquet column holding the text")
    e.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (default: a run dir's train.seq_len, else min(model.max_seq_len, 1024)); "
                        "lm-eval's context window")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--tasks", default=None, help="lm-eval task names, comma-separated (needs jaxllm[eval])")
    e.add_argument("--include-path", default=None, help="a directory of extra lm-eval task YAMLs")
    e.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many documents per task")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--tokenizer", default=None, help="tokenizer file or dir, instead of SRC's own")
    e.set_defaults(func=_eval)
