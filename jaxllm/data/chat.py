"""Chat data for SFT: conversations -> tokens + loss mask, packed by the same grain pipeline.

Records (JSONL lines, Parquet rows or ArrayRecord JSON records; mixtures as for text):

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"prompt": str, "completion": str}          # = one user turn and one assistant turn

Templates. The built-in ChatML (`<|im_start|>role\\n...<|im_end|>\\n`, after bos where the
tokenizer has one) uses the pieces our SentencePiece tokenizers reserve (ids 4 and 5). An
imported checkpoint's Jinja `chat_template` (tokenizer_config.json) is rendered the way
transformers' apply_chat_template does (sandboxed jinja2, trim/lstrip blocks, raise_exception,
tojson). The rendered text is tokenized whole, as transformers does, and the mask is read off
character spans:

    target (loss_mask=1)   assistant content and its end-of-turn token (<|im_end|>, <|eot_id|>)
    not a target           system and user turns, role headers, anything after end-of-turn

A Jinja template's assistant spans are found by rendering message prefixes: the conversation up
to message k, and up to k plus the generation prompt, must each be a prefix of the whole
rendering (the generation prompt ends where the answer starts; the answer ends at the first
special token after its content). A template that reorders, merges or rewrites earlier turns
fails that check, and is refused by name.

Long examples (more tokens than a row): `truncate` keeps the preamble (bos, system prompt) and
drops the earliest turns, else cuts the prompt from the left, always keeping the last
assistant message whole; `drop` leaves the example out. Both are counted. Bad records (no
assistant turn, unknown role, non-string content, malformed JSON, a template that fails on
them) are skipped and counted, or stop the run with data.strict=true. Before training, every
record is rendered once (`scan`): process 0 prints one line with the counts, and no usable
example at all is an error. An example is never split across rows; packed rows keep each
example's segment and mask.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
import sys
from typing import Any, NamedTuple, Sequence

import grain
import numpy as np

from jaxllm.data import packing
from jaxllm.data.hf_tokenizer import require
from jaxllm.data.sources import BadRecords, DataError, Record, check_utf8, open_source
from jaxllm.data.tokenizer import MASK_TOKEN, fingerprint
from jaxllm.errors import UserError

ROLES = ("system", "user", "assistant")
CHATML = "chatml"
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"


class ChatTemplateError(UserError):
    """The template cannot be used for training (the message names it); not a data problem."""


# --- records ----------------------------------------------------------------------------------

def check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[dict]:
    """A conversation as a list of {"role", "content"} dicts, or a DataError saying why not."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list, got {str(messages)[:60]!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be an object with role and content, got {m!r:.60}")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {role!r} (valid: {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) content must be a string, got "
                            f"{type(content).__name__}")
        check_utf8(content, where)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    return messages


def conversation(obj: dict, where: str) -> list[dict]:
    """A record -> its messages ({"messages": [...]} or {"prompt", "completion"})."""
    if "messages" in obj:
        return check_messages(obj["messages"], where)
    if "prompt" in obj and "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}")
        return check_messages([{"role": "user", "content": obj["prompt"]},
                               {"role": "assistant", "content": obj["completion"]}], where)
    raise DataError(f"{where}: a chat record needs 'messages' or 'prompt' and 'completion' "
                    f"(fields present: {sorted(obj)[:10]})")


# --- templates --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _environment():
    """The sandboxed Jinja environment transformers renders chat templates in."""
    jinja2 = require("jinja2", "a Jinja chat template")
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(ext.Extension):
        """{% generation %}...{% endgeneration %} (transformers' assistant-mask markers):
        rendered as their body; our masks come from the prefix renderings."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)   # Llama-3.x's date line
    return env


def special_tokens(tokenizer) -> dict[str, str]:
    """The special-token variables transformers passes a template: {bos,eos,unk,pad}_token for
    those the tokenizer defines (pad_id falls back to unk/eos when none is; that is no pad)."""
    sp = getattr(tokenizer, "sp", None)   # SentencePiece: -1 when the model has no pad piece
    if sp is not None:
        pad = tokenizer.pad_id if sp.pad_id() >= 0 else None
    else:   # HF: the pad_token of tokenizer_config.json
        pad = tokenizer.pad_id if (getattr(tokenizer, "_config", None) or {}).get("pad_token") else None
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "unk": getattr(tokenizer, "unk_id", None),
           "pad": pad}
    return {f"{k}_token": tokenizer.id_to_piece(i) for k, i in ids.items() if i is not None and i >= 0}


class ChatTemplate:
    """Built-in ChatML (`source` None) or a Jinja template; `name` says where it came from."""

    def __init__(self, source: str | None, name: str):
        self.source, self.name = source, name
        self._compiled = None
        if source is not None:
            self._compile()  # a syntax error is found now, not at the first record

    def _compile(self):
        if self._compiled is None:
            jinja2 = require("jinja2", f"the chat template {self.name}")
            try:
                self._compiled = _environment().from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"chat template {self.name}: Jinja syntax error at line "
                                        f"{e.lineno}: {e.message}") from None
        return self._compiled

    def __getstate__(self):  # compiled templates do not pickle; grain workers recompile
        return {"source": self.source, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["source"], state["name"])

    def __eq__(self, other):
        return isinstance(other, ChatTemplate) and (self.source, self.name) == (other.source, other.name)

    def __hash__(self):
        return hash((self.source, self.name))

    def __repr__(self):
        return f"ChatTemplate({self.name})"

    def render(self, messages: list[dict], add_generation_prompt: bool, tokenizer) -> str:
        """Jinja rendering with the variables transformers passes; a template error (including
        raise_exception) comes back as a DataError: it is this conversation the template
        refuses."""
        jinja2 = require("jinja2", f"the chat template {self.name}")
        specials = special_tokens(tokenizer)
        try:
            return self._compile().render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **specials)
        except jinja2.TemplateError as e:
            raise DataError(f"chat template {self.name} failed on this conversation: {e}") from None


def resolve_template(tokenizer, template: ChatTemplate | str | None = None) -> ChatTemplate:
    """None: the tokenizer's own template (an imported checkpoint's), else ChatML; "chatml";
    a ChatTemplate; or a Jinja source string."""
    if isinstance(template, ChatTemplate):
        return template
    if template == CHATML:
        return ChatTemplate(None, "built-in ChatML")
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if own is None:
            return ChatTemplate(None, "built-in ChatML")
        return ChatTemplate(own, f"chat_template of {tokenizer.path}")
    return ChatTemplate(template, f"given as a string ({template[:40]!r}...)")


def load_template(spec: str, tokenizer) -> ChatTemplate:
    """data.chat_template: "" (the tokenizer's own, else ChatML), "chatml", a .jinja file, or a
    tokenizer_config.json (or a checkpoint directory holding one) whose template to use."""
    if not spec:
        return resolve_template(tokenizer)
    if spec == CHATML:
        return resolve_template(tokenizer, CHATML)
    p = pathlib.Path(spec)
    if p.is_dir():
        p = p / "chat_template.jinja" if (p / "chat_template.jinja").exists() else p / "tokenizer_config.json"
    if not p.is_file():
        raise ChatTemplateError(f"data.chat_template: {spec} does not exist; give 'chatml', a Jinja "
                                f"template file or a tokenizer_config.json holding chat_template")
    if p.suffix == ".json":
        from jaxllm.data.hf_tokenizer import chat_template_of
        source = chat_template_of(json.loads(p.read_text(encoding="utf-8")), p.parent / "-", str(p))
        if source is None:
            raise ChatTemplateError(f"data.chat_template: {p} has no chat_template")
        return ChatTemplate(source, str(p))
    return ChatTemplate(p.read_text(encoding="utf-8"), str(p))


# --- rendering --------------------------------------------------------------------------------

class Rendering(NamedTuple):
    ids: np.ndarray          # int32 (n,)
    mask: np.ndarray         # int32 (n,): 1 where the token is a target
    turn_starts: list[int]   # token index at which each message's rendering starts
    roles: list[str]


@functools.lru_cache(maxsize=16)
def _end_of_turn_pattern(tokenizer) -> re.Pattern:
    """Special-token texts that can end an assistant turn (any special but <mask>)."""
    texts = set(tokenizer.special_ids) - {MASK_TOKEN}
    texts |= {tokenizer.id_to_piece(i) for i in (tokenizer.eos_id, tokenizer.bos_id) if i is not None}
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True) if t))


def _chatml_text(tokenizer, messages: list[dict], generation_prompt: bool):
    if tokenizer.im_start_id is None or tokenizer.im_end_id is None:
        raise ChatTemplateError(
            f"{tokenizer.path} has no chat template of its own and no {_IM_START}/{_IM_END} tokens for "
            f"the built-in ChatML; set data.chat_template to a Jinja template file")
    parts, pos, targets, starts = [], 0, [], []
    for m in messages:
        starts.append(pos)
        head, body = f"{_IM_START}{m['role']}\n", m["content"] + _IM_END
        if m["role"] == "assistant":
            targets.append((pos + len(head), pos + len(head) + len(body)))
        parts.append(head + body + "\n")
        pos += len(parts[-1])
    if generation_prompt:
        parts.append(f"{_IM_START}assistant\n")
    return "".join(parts), targets, starts


def _prefix_end(full: str, part: str, pos: int, template: ChatTemplate, what: str) -> int:
    if not (len(part) >= pos and full.startswith(part)):
        raise ChatTemplateError(
            f"chat template {template.name} cannot be split into turns: rendering {what} is not a "
            f"prefix of rendering the whole conversation (the template reorders, merges or rewrites "
            f"earlier messages), so the assistant spans cannot be found; use a template whose turns "
            f"only append (or 'chatml')")
    return len(part)


def _answer_end(body: str, content: str, tokenizer, template: ChatTemplate, k: int) -> int:
    """Where the assistant's target span ends within its rendered turn: after the first special
    token that follows the content (its end-of-turn)."""
    c = content.strip()
    at = body.find(c) if c else -1
    m = _end_of_turn_pattern(tokenizer).search(body, at + len(c) if at >= 0 else 0)
    if m is None:
        raise ChatTemplateError(
            f"chat template {template.name}: the assistant turn (message {k}) renders no special "
            f"end-of-turn token after its content ({body[-60:]!r}), so a model would never learn to stop")
    return m.end()


def _jinja_text(template: ChatTemplate, tokenizer, messages: list[dict]):
    def r(msgs, gen):
        return template.render(msgs, gen, tokenizer)
    full = r(messages, False)
    pos, targets, starts = 0, [], []
    for k, m in enumerate(messages):
        starts.append(pos)
        if m["role"] == "assistant":
            pos = _prefix_end(full, r(messages[:k], True), pos, template,
                              f"the first {k} messages with the generation prompt")
            answer_start = pos
        upto = full if k == len(messages) - 1 else r(messages[:k + 1], False)
        end = _prefix_end(full, upto, pos, template, f"the first {k + 1} messages")
        if m["role"] == "assistant":
            targets.append((answer_start, answer_start +
                            _answer_end(full[answer_start:end], m["content"], tokenizer, template, k)))
        pos = end
    return full, targets, starts


def render(messages: list[dict], tokenizer, template: ChatTemplate) -> Rendering:
    """Tokens, loss mask and turn boundaries of a whole conversation (for training)."""
    if template.source is None:
        text, targets, starts = _chatml_text(tokenizer, messages, False)
    else:
        text, targets, starts = _jinja_text(template, tokenizer, messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    if template.source is None and tokenizer.bos_id is not None:
        ids, offsets = [tokenizer.bos_id] + ids, [-1] + offsets
    offsets = np.asarray(offsets, np.int64)
    mask = np.zeros(len(ids), np.int32)
    for a, b in targets:  # a token is a target when its first character is in an answer span
        mask[(offsets >= a) & (offsets < b)] = 1
    turn_starts = np.searchsorted(offsets, starts, side="left").tolist()
    return Rendering(np.asarray(ids, np.int32), mask, turn_starts, [m["role"] for m in messages])


def render_chat(messages: Sequence[dict], tokenizer, template: ChatTemplate | str | None = None
                ) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation; template as in `resolve_template`."""
    r = render(check_messages(list(messages), "messages", need_assistant=False), tokenizer,
               resolve_template(tokenizer, template))
    return r.ids.tolist(), r.mask.tolist()


def chat_prompt(messages: Sequence[dict], tokenizer, template: ChatTemplate | str | None = None) -> list[int]:
    """The generation prompt: the conversation rendered up to and including the assistant
    header, i.e. the tokens a model continues with its answer."""
    template = resolve_template(tokenizer, template)
    messages = check_messages(list(messages), "messages", need_assistant=False)
    if template.source is None:
        ids = tokenizer.encode_with_offsets(_chatml_text(tokenizer, messages, True)[0])[0]
        return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids
    return tokenizer.encode_with_offsets(template.render(messages, True, tokenizer))[0]


# --- long examples ----------------------------------------------------------------------------

def fit(r: Rendering, seq_len: int, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, note) of an example in at most `seq_len` tokens (see the module docstring)."""
    n = len(r.ids)
    if n <= seq_len:
        return r.ids, r.mask, packing.DOC
    empty = np.zeros((0,), np.int32)
    if mode == "drop":
        return empty, empty, packing.DROPPED
    last = max(k for k, role in enumerate(r.roles) if role == "assistant")
    a = r.turn_starts[last]
    e = r.turn_starts[last + 1] if last + 1 < len(r.roles) else n
    first = next(k for k, role in enumerate(r.roles) if role != "system")
    p = r.turn_starts[first]  # the preamble: bos, system turns, a template's default system

    def keep(*ranges):
        idx = np.concatenate([np.arange(s, t) for s, t in ranges])
        return r.ids[idx], r.mask[idx], packing.TRUNCATED

    if e <= seq_len:              # only turns after the last answer made it long
        return keep((0, e))
    for k in range(first, last):  # drop whole turns from the start; keep starting at a prompt turn
        if r.roles[k] != "assistant" and p + e - r.turn_starts[k] <= seq_len:
            return keep((0, p), (r.turn_starts[k], e))
    if seq_len - p >= e - a:      # cut the prompt from the left, after the preamble
        return keep((0, p), (e - (seq_len - p), e))
    if seq_len >= e - a:          # no room for the preamble
        return keep((e - seq_len, e))
    return empty, empty, packing.DROPPED   # the last assistant message alone exceeds a row


# --- the pipeline stage -----------------------------------------------------------------------

class RecordView:
    """A source's records as whole JSON objects (a grain data source)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        return self.source.record(index)


def open_chat_source(cfg) -> RecordView:
    if cfg.text_field != "text" or cfg.text_unit != "file":
        raise UserError(f"chat source '{cfg.path}': text_field/text_unit do not apply to chat records "
                        f"(they are read from 'messages' or 'prompt'/'completion'); remove them")
    return RecordView(open_source(cfg, records=True))


class ChatEncode:
    """Record (or Bad) -> {"tokens", "loss_mask", "note"}: a packer element of at most seq_len."""

    def __init__(self, tokenizer, template: ChatTemplate, seq_len: int, long_examples: str, strict: bool):
        self.tok, self.template, self.seq_len = tokenizer, template, seq_len
        self.long_examples, self.strict = long_examples, strict

    def encode(self, rec: Record) -> tuple[np.ndarray, np.ndarray, int]:
        """Raises DataError for a bad record (with its location)."""
        try:
            r = render(conversation(rec.obj, rec.where), self.tok, self.template)
        except DataError as e:
            msg = str(e)
            raise DataError(msg if msg.startswith(rec.where) else f"{rec.where}: {msg}") from None
        return fit(r, self.seq_len, self.long_examples)

    def __call__(self, rec) -> dict:
        empty = np.zeros((0,), np.int32)
        if isinstance(rec, packing.Bad):
            return {"tokens": empty, "loss_mask": empty, "note": packing.SKIPPED}
        try:
            ids, mask, note = self.encode(rec)
        except DataError:
            if self.strict:
                raise
            return {"tokens": empty, "loss_mask": empty, "note": packing.SKIPPED}
        return {"tokens": ids, "loss_mask": mask, "note": note}


def chat_rows(records: grain.MapDataset, encoder: ChatEncode, *, mode: str, num_bins: int, seed: int,
              shuffle_bins: bool = True) -> grain.IterDataset:
    """The per-shard chat chain: MapDataset of Record/Bad -> IterDataset of packed rows."""
    ds = records.map(encoder).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64))
    return packing.pack(ds, seq_len=encoder.seq_len, mode=mode, num_bins=num_bins, seed=seed,
                        pad_id=encoder.tok.pad_id, shuffle_bins=shuffle_bins, with_mask=True)


# --- the start-up scan ------------------------------------------------------------------------

_SCANS: dict[tuple, dict] = {}   # scans already done in this process


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns


def scan(sources: list, encoder: ChatEncode, *, label: str, verbose: bool = True, show: int = 5) -> dict:
    """Render every record once: counts of examples, truncated, dropped and bad records; the
    first `show` bad locations. strict: the first bad record raises. No usable example raises.
    Prints one line when `verbose` (process 0). Cached per process by file versions."""
    paths = [p for _, src in sources for p in src.source.files.paths]
    key = (label, tuple(c for c, _ in sources), encoder.template, fingerprint(encoder.tok),
           encoder.seq_len, encoder.long_examples, encoder.strict, tuple(_stamp(p) for p in paths))
    first_time = key not in _SCANS
    if first_time:
        counts = {"records": 0, "examples": 0, "truncated": 0, "dropped": 0, "bad": 0}
        bad = BadRecords(encoder.strict, show)
        for _, src in sources:
            for i in range(len(src)):
                counts["records"] += 1
                ok, enc = bad.read(lambda: encoder.encode(src[i]))
                if not ok:
                    continue
                note = enc[2]
                counts["examples"] += note != packing.DROPPED
                counts["truncated"] += note == packing.TRUNCATED
                counts["dropped"] += note == packing.DROPPED
        counts["bad"], counts["first_bad"] = bad.count, bad.first
        if not counts["examples"]:
            why = (f"{counts['bad']} bad records (first: {'; '.join(bad.first[:2])})" if counts["bad"] else "") + \
                  (f"{', ' if counts['bad'] else ''}{counts['dropped']} dropped as longer than "
                   f"{encoder.seq_len} tokens" if counts["dropped"] else "")
            raise DataError(f"no usable chat examples in {label} data {[c.path for c, _ in sources]}: "
                            f"{counts['records']} records, {why or 'none'}")
        _SCANS[key] = counts
    counts = _SCANS[key]
    if verbose and first_time:   # an eval iterator made again at every evaluation says it once
        line = (f"chat {label} data: {counts['records']} records in {len(sources)} "
                f"source{'s' if len(sources) > 1 else ''} -> "
                f"{counts['examples']} examples ({counts['truncated']} truncated to seq_len={encoder.seq_len}), "
                f"{counts['dropped']} dropped as longer (data.long_examples={encoder.long_examples}), "
                f"{counts['bad']} bad records skipped")
        if counts["first_bad"]:
            line += "; first: " + " | ".join(counts["first_bad"])
        print(line, file=sys.stderr, flush=True)
    return counts
