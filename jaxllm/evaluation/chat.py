"""`jaxllm chat`: talk to a model in the terminal, its answer printed as it is generated.

Each turn renders the whole conversation with the chat template (the tokenizer's own, else
ChatML; data.chat's chat_prompt, so exactly what SFT trained on) up to the assistant header,
and decodes step by step on the host (model.generate.stream) until an end-of-turn token
(<|im_end|>, <|eot_id|>, ...) or eos. A conversation longer than the model's window loses
its earliest turns, and says so. Lines: /reset clears the conversation, /exit (or end of
input) leaves.
"""
from __future__ import annotations

import sys
from typing import TextIO

import jax

from jaxllm.data.chat import chat_prompt, load_template
from jaxllm.errors import UserError
from jaxllm.evaluation.source import Model
from jaxllm.model.generate import stream

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """eos and every end-of-turn marker the tokenizer has as a special token."""
    ids = {tokenizer.special_ids[t] for t in END_OF_TURN if t in tokenizer.special_ids}
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    if not ids:
        raise UserError(f"{tokenizer.path}: no eos or end-of-turn token, so an answer could not end")
    return tuple(sorted(ids))


def _fit(messages: list[dict], tokenizer, template, room: int, log) -> list[int] | None:
    """The prompt ids of the conversation, dropping the earliest turns after any system
    message until it fits in `room` tokens; None if the last user message alone does not."""
    while True:
        ids = chat_prompt(messages, tokenizer, template)
        if len(ids) <= room:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None
        # a user turn and its answer go together: templates expect user/assistant alternation
        del messages[first:first + (2 if messages[first + 1]["role"] == "assistant" else 1)]
        log("[the conversation is longer than the model's window: dropped the earliest exchange]")


def chat_loop(model: Model, *, template: str = "", system: str | None = None, max_new_tokens: int = 256,
              temperature: float = 0.7, top_k: int = 0, top_p: float = 0.9, seed: int = 0,
              stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run the conversation; returns the number of answered turns."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tok, cfg = model.tokenizer, model.cfg
    tmpl = load_template(template, tok)
    stops = end_of_turn_ids(tok)
    room = cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise UserError(f"chat: --max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"max_seq_len={cfg.max_seq_len}")
    key = jax.random.key(seed)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    log(f"chat with {model.src} ({tmpl.name}); /reset clears the conversation, /exit leaves")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    turns = 0
    while True:
        if stdin.isatty():
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return turns
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(start)
            log("[conversation cleared]")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = _fit(messages, tok, tmpl, room, log)
        if ids is None:
            messages.pop()
            log(f"[that message alone is longer than the model's window of {cfg.max_seq_len} tokens "
                f"minus {max_new_tokens} for the answer; say less or lower --max-new-tokens]")
            continue
        reply, shown, ended = [], "", False
        for t in stream(model.params, ids, cfg, max_new_tokens=max_new_tokens, key=jax.random.fold_in(key, turns),
                        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=None, stop_ids=stops,
                        vocab_limit=tok.vocab_size):
            if t in stops:
                ended = True
                break
            reply.append(t)
            now = tok.decode(reply)
            # print what is new; an unfinished multi-byte character decodes to U+FFFD: wait for it
            if now.startswith(shown) and not now.endswith("\ufffd"):
                stdout.write(now[len(shown):])
                stdout.flush()
                shown = now
        answer = tok.decode(reply)
        stdout.write((answer[len(shown):] if answer.startswith(shown) else "") + "\n")
        stdout.flush()
        if not ended:
            log(f"[stopped after --max-new-tokens {max_new_tokens} tokens without an end of turn]")
        messages.append({"role": "assistant", "content": answer})
        turns += 1
