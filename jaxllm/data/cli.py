"""`jaxllm tokenizer ...` and `jaxllm data ...`: the data layer's command-line verbs.

    jaxllm data synth --out data/synth                      # the embedded default corpus
    jaxllm tokenizer train --input 'data/synth/pretrain/train-*.jsonl' --vocab-size 512 \
        --out data/tokenizer
    jaxllm tokenizer encode --tokenizer data/tokenizer "Once upon a time"
"""
from __future__ import annotations

import json
import sys

from jaxllm.errors import UserError


def _fail(e: Exception) -> None:
    # User mistakes (bad files, impossible vocab sizes) get one clear line, not a traceback.
    print(f"jaxllm: error: {e}", file=sys.stderr)
    raise SystemExit(2)


def _tokenizer_train(args) -> None:
    from jaxllm.data.sources import DataError, iter_texts
    from jaxllm.data.tokenizer import train_tokenizer
    try:
        tok = train_tokenizer(iter_texts(args.input, args.text_field, args.text_unit, args.max_docs),
                              args.out, args.vocab_size, model_type=args.model_type, seed=args.seed)
    except (DataError, ValueError, FileNotFoundError) as e:
        _fail(e)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces; bos={tok.bos_id} eos={tok.eos_id} "
          f"pad={tok.pad_id} chat={tok.special_ids})")


def _tokenizer_encode(args) -> None:
    from jaxllm.data.tokenizer import load_tokenizer
    try:
        tok = load_tokenizer(args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text)
    print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))


def _data_synth(args) -> None:
    from jaxllm.data.synthetic import write_corpus
    if args.train_docs < 1 or args.eval_docs < 1:
        raise UserError(f"data synth: --train-docs and --eval-docs must be >= 1, got {args.train_docs}, "
                        f"{args.eval_docs}")
    if not 1 <= args.shards <= args.train_docs:   # every shard file holds a document
        raise UserError(f"data synth: --shards must be between 1 and --train-docs ({args.train_docs}), "
                        f"got {args.shards}")
    counts = write_corpus(args.out, train_docs=args.train_docs, eval_docs=args.eval_docs,
                          seed=args.seed, shards=args.shards, tasks=not args.no_tasks)
    for rel, n in counts.items():
        print(f"{args.out}/{rel}: {n} records")


def _data_rank(args) -> None:
    from jaxllm.evaluation.source import load_model, template_for
    from jaxllm.rl.labels import check_output_path, label_file
    check_output_path(args.out, args.prompts, args.overwrite)   # before the model loads and samples
    if args.k < 2 or args.num < 0 or args.top_k < 0:
        raise UserError(f"data rank: --k must be >= 2 (a ranking needs 2 answers), --num and --top-k >= 0, "
                        f"got --k {args.k} --num {args.num} --top-k {args.top_k}")
    template = template_for(args.model, args.chat_template, lambda m: print(m, file=sys.stderr))
    model = load_model(args.model, args.tokenizer)
    print(label_file(model, args.prompts, args.out, num=args.num, k=args.k, temperature=args.temperature,
                     top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed, template=template,
                     overwrite=args.overwrite))


def register(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train or use a SentencePiece tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_cmd", required=True)
    tr = tsub.add_parser("train", help="train a tokenizer on JSONL/Parquet/text/ArrayRecord files")
    tr.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", required=True, help="directory for tokenizer.model and tokenizer.vocab")
    tr.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tr.add_argument("--text-field", default="text", help="JSON key / Parquet column with the text")
    tr.add_argument("--text-unit", choices=("file", "line"), default="file",
                    help="plain text files: one document per file or per line")
    tr.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=_tokenizer_train)
    en = tsub.add_parser("encode", help="print the ids and pieces of a text (or stdin)")
    en.add_argument("--tokenizer", required=True,
                    help=".model file, tokenizer.json, or a directory holding either (HF: the `hf` extra)")
    en.add_argument("text", nargs="?", default=None)
    en.set_defaults(func=_tokenizer_encode)

    data = subparsers.add_parser("data", help="data utilities")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    sy = dsub.add_parser("synth", help="write the embedded default corpus (no download) as JSONL")
    sy.add_argument("--out", required=True)
    sy.add_argument("--train-docs", type=int, default=20_000)
    sy.add_argument("--eval-docs", type=int, default=1_000)
    sy.add_argument("--shards", type=int, default=4, help="pretraining train files")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--no-tasks", action="store_true", help="skip chat/reward/ppo files")
    sy.set_defaults(func=_data_synth)
    rk = dsub.add_parser("rank", help="rank a model's own sampled answers with the synthetic tasks' "
                                      "programmatic preference (reward-model data, as InstructGPT's labelers)")
    rk.add_argument("--model", required=True, help="run dir / checkpoint / HF dir of the policy (an SFT run)")
    rk.add_argument("--tokenizer", default=None, help="tokenizer file or dir, instead of the model's own")
    rk.add_argument("--prompts", required=True, help="prompt records with a 'task' (data/synth/ppo/*.jsonl)")
    rk.add_argument("--out", required=True, help="JSONL of {prompt, responses (best first), scores}")
    rk.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    rk.add_argument("--num", type=int, default=0, help="use the first N prompts (0: all)")
    rk.add_argument("--k", type=int, default=4, help="answers sampled per prompt")
    rk.add_argument("--temperature", type=float, default=1.0)
    rk.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all); "
                                                          "use the PPO recipe's rl.top_k")
    rk.add_argument("--max-new-tokens", type=int, default=48)
    rk.add_argument("--chat-template", default=None,
                    help="default: the model run's data.chat_template (else the tokenizer's own, else ChatML)")
    rk.add_argument("--seed", type=int, default=0)
    rk.set_defaults(func=_data_rank)
