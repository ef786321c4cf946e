"""lm-evaluation-harness on a jaxllm model: standard benchmarks without converting to torch.

    pip install 'jaxllm[eval]'
    jaxllm eval runs/my-run --tasks hellaswag,arc_easy            # or, from Python:

    import lm_eval
    from jaxllm.evaluation.lm_eval_adapter import JaxLLM
    lm = JaxLLM(src="runs/my-run")          # or JaxLLM(params=..., model_cfg=..., tokenizer=...)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

Importing this module also registers the model name "jaxllm" with lm-eval's registry
(`simple_evaluate(model="jaxllm", model_args="src=runs/my-run")`).

The three request types, as lm-eval defines them (lm_eval.api.model.LM):
  loglikelihood(context, continuation) -> (sum log p(continuation | context), is_greedy)
      TemplateLM splits the text into tokens (the whole string is tokenized and the context's
      tokens cut off, so merges across the boundary are kept); an empty context is scored after
      prefix_token_id (bos, else eos). Inputs longer than max_length keep their last tokens.
  loglikelihood_rolling(text) -> sum log p(text) over disjoint rolling windows of max_length
      (lm_eval.utils.get_rolling_token_windows), the first token predicted from the prefix token.
  generate_until(context, gen_kwargs) -> greedy (or sampled, do_sample=True) text, cut at the
      first of gen_kwargs["until"] (default: the eos text), at most max_gen_toks tokens.

Scores come from one trunk pass per row and heads.token_stats (the training loss's own
log-probs); generation is jaxllm.model.generate. Rows are batched batch_size at a time and
padded to widths in steps of 64 tokens, so a benchmark compiles only a handful of shapes.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.data.hf_tokenizer import MissingExtra
from jaxllm.errors import UserError

try:
    import lm_eval  # noqa: F401
except ImportError:
    raise MissingExtra("the lm-evaluation-harness adapter needs the 'lm_eval' package, which is not "
                       "installed: pip install 'jaxllm[eval]'") from None
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from jaxllm.model.api import trunk  # noqa: E402
from jaxllm.model.generate import decode_rows, generate  # noqa: E402
from jaxllm.model.heads import token_stats  # noqa: E402

WIDTH_STEP = 64
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _width(n: int, limit: int) -> int:
    return min(-(-n // WIDTH_STEP) * WIDTH_STEP, limit)


@register_model("jaxllm")
class JaxLLM(TemplateLM):
    """An lm-eval LM over jaxllm params. `src` (a run / checkpoint / HF dir) or the three objects.
    max_length: context window (default model.max_seq_len); seed: key of sampled generations."""

    def __init__(self, params=None, model_cfg=None, tokenizer=None, *, src: str | None = None,
                 tokenizer_path: str | None = None, batch_size: int | str = 8, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, seed: int | str = 0, **unused):
        super().__init__()
        if unused:
            raise UserError(f"JaxLLM: unknown model_args {sorted(unused)} (valid: src, tokenizer_path, "
                            f"batch_size, max_length, max_gen_toks, seed)")
        if src is not None:
            from jaxllm.evaluation.source import load_model
            model_cfg, params, tokenizer, _ = load_model(src, tokenizer_path)
        if params is None or model_cfg is None or tokenizer is None:
            raise UserError("JaxLLM needs src=DIR, or params, model_cfg and tokenizer")
        if tokenizer.eos_id is None:
            raise UserError(f"JaxLLM: the tokenizer {tokenizer.path} has no eos token, which lm-eval "
                            f"uses as end of text")
        self.params, self.model_cfg, self.tokenizer = params, model_cfg, tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length or model_cfg.max_seq_len)
        if not 2 <= self.max_length <= model_cfg.max_seq_len:
            raise UserError(f"JaxLLM: max_length must be in [2, model.max_seq_len={model_cfg.max_seq_len}], "
                            f"got {self.max_length}")
        self.max_gen_toks = int(max_gen_toks)
        self.key = jax.random.key(int(seed))
        cfg = model_cfg

        @jax.jit
        def score(params, tokens_bt, targets_bt):
            hidden_btd, _ = trunk(params, tokens_bt, cfg)
            stats = token_stats(params, hidden_btd, targets_bt, cfg)
            return stats["logprob"], stats["correct"]
        self._score = score

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        if add_special_tokens and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ scoring
    def score_tokens(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of log p(continuation), all of it argmax).
        The context is cut from the left to fit max_length; a continuation longer than the
        window keeps its last max_length tokens (as lm-eval's HF model does)."""
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        prepared = []
        for i, (ctx, cont) in enumerate(rows):
            if not cont:
                raise UserError(f"lm-eval request {i}: empty continuation (nothing to score)")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            prepared.append((i, whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        prepared.sort(key=lambda r: -len(r[1]))      # similar lengths share a batch
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start:start + self.batch_size]
            width = _width(len(chunk[0][1]), self.max_length)
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for r, (_, inp, tgt, _) in enumerate(chunk):   # right padding: causal, never read
                tokens[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
            logprob, correct = map(np.asarray, self._score(self.params, jnp.asarray(tokens), jnp.asarray(targets)))
            for r, (i, inp, _, n) in enumerate(chunk):
                sl = slice(len(inp) - n, len(inp))
                out[i] = (float(logprob[r, sl].sum()), bool(correct[r, sl].all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None and key[0] is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self.score_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    def _settings(self, gen_kwargs: dict) -> dict:
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise UserError(f"JaxLLM.generate_until: unsupported gen_kwargs {unknown} (supported: "
                            f"{sorted(GEN_KWARGS)})")
        until = gen_kwargs.get("until", [self.tok_decode([self.eot_token_id])])
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 1.0)) > 0
        return {"until": tuple(until), "max_gen_toks": int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                "temperature": float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                "top_k": int(gen_kwargs.get("top_k") or 0) if sample else 0,
                "top_p": float(gen_kwargs.get("top_p") or 1.0) if sample else 1.0}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            _, gen_kwargs = req.args
            s = self._settings(dict(gen_kwargs))
            settings.append(s)
            groups.setdefault(tuple(sorted(s.items())), []).append(i)
        for idx in groups.values():
            s = settings[idx[0]]
            n = min(s["max_gen_toks"], self.max_length - 1)
            keep = self.max_length - n                    # context tokens that fit beside n new ones
            for start in range(0, len(idx), self.batch_size):
                rows = idx[start:start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-keep:] for i in rows]
                width = _width(max(map(len, prompts)), keep)
                tokens = np.zeros((self.batch_size, width), np.int32)
                mask = np.zeros((self.batch_size, width), np.int32)
                for r in range(self.batch_size):            # filler rows repeat the first prompt
                    p = prompts[r] if r < len(prompts) else prompts[0]
                    tokens[r, width - len(p):], mask[r, width - len(p):] = p, 1
                self.key, key = jax.random.split(self.key)
                gen = generate(self.params, tokens, self.model_cfg, prompt_mask=mask, max_new_tokens=n,
                               key=key, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                               eos_id=self.eot_token_id, pad_id=self.tokenizer.pad_id,
                               vocab_limit=self.tokenizer.vocab_size)
                for i, text in zip(rows, decode_rows(self.tokenizer, gen)):
                    for stop in s["until"]:
                        if stop:
                            text = text.split(stop, 1)[0]
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
        return out


def run_tasks(model: JaxLLM, tasks: list[str], *, include_path: str | None = None, include_defaults: bool = True,
              limit: float | None = None, num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on `tasks`: lm-eval's own task names and/or YAML tasks found under
    include_path (include_defaults=False skips indexing lm-eval's ~10k built-in task files)."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise UserError(f"lm-eval knows no task {missing}" + (f" (also looked in {include_path})" if include_path
                                                              else " (--include-path DIR adds task YAMLs)"))
    print(f"lm-eval: {len(tasks)} task(s) {tasks}", file=sys.stderr)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=log_samples)
