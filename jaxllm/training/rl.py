"""Recipe: RLHF with PPO (policy + value head, KL to a frozen reference, a reward model) or
GRPO (G samples per prompt, group-normalised advantages, no critic). One loop for both:

    for each iteration:
        prompts -> rollouts (KV-cache sampler)             rl/rollout.py, model/generate.py
        -> scores (reward model at the eos, or the programmatic task reward)
        -> old log-probs, values, reference log-probs      one jitted scoring pass
        -> PPO: per-token rewards (score - beta * KL), GAE, whitening;  GRPO: group advantages
        -> rl.epochs x rl.minibatches updates              THE train step (objectives/ppo.py, grpo.py)

The policy is the full model (the reference is then a frozen copy) or a LoRA/adapter delta
over a frozen base (the reference is the base with the delta switched off: no second copy).
train.steps counts iterations and train.batch_size prompts per iteration. Checkpoints are
written at iteration boundaries with the controller state (iteration, KL coefficient, prompt
stream position); rollout keys derive from (seed, iteration), so a resumed run repeats the
uninterrupted run's iterations exactly.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import Config, RLConfig
from jaxllm.configlib import ConfigError
from jaxllm.data.pipeline import global_mean, load_tokenizer_for, local_rows, on_every_process, to_global_batch
from jaxllm.model.api import init_params, param_logical_axes, param_shapes
from jaxllm.model.generate import generate
from jaxllm.objectives.grpo import make_grpo_loss
from jaxllm.objectives.policy import init_value_head, policy_outputs, reference_params
from jaxllm.objectives.ppo import make_ppo_loss
from jaxllm.rl import rollout as R
from jaxllm.rl.advantages import gae, group_advantages, masked_mean, masked_whiten
from jaxllm.rl.kl import AdaptiveKL, kl_estimate, per_token_rewards
from jaxllm.training.optim import lr_schedule, make_optimizer, skip_metrics
from jaxllm.training.run import Run
from jaxllm.training.step import make_train_step


def _stop_ids(tok) -> tuple[int, ...]:
    ids = {tok.eos_id}
    for piece in ("<|im_end|>", "<|eot_id|>"):
        if piece in tok.special_ids:
            ids.add(tok.special_ids[piece])
    return tuple(sorted(i for i in ids if i is not None))


# rl.* keys that only PPO reads, and why GRPO does not: a non-default value under GRPO is refused
_NO_GAE = "takes group-normalised scores as advantages (no GAE)"
PPO_ONLY = {
    "value_init": "has no critic", "value_lr": "has no critic", "vf_coef": "has no critic",
    "value_clip": "has no critic", "gamma": _NO_GAE, "lam": _NO_GAE,
    "whiten_advantages": "normalises advantages within each group",
    "entropy_coef": "has no entropy bonus in its loss",
    "kl_estimator": "always puts the k3 estimator in its loss (DeepSeekMath); rl.kl_estimator is PPO's "
                    "reward penalty"}


def _check(cfg: Config):
    t, rl = cfg.train, cfg.rl
    if cfg.data.kind != "chat":
        raise ConfigError("RL reads prompt records through the chat template: set data.kind=chat "
                          "and data.sources to prompt files (e.g. data/synth/ppo/train.jsonl)")
    if t.objective == "grpo":
        for name, why in PPO_ONLY.items():
            if getattr(rl, name) != getattr(RLConfig, name):
                now, default = (str(v).lower() if isinstance(v, bool) else v
                                for v in (getattr(rl, name), getattr(RLConfig, name)))
                raise ConfigError(f"train.objective=grpo {why}: rl.{name}={now} would do nothing "
                                  f"(leave it at its default, {default})")
    if t.objective == "grpo" and rl.group_size < 2:
        raise ConfigError("train.objective=grpo needs rl.group_size >= 2 samples per prompt")
    rows = t.batch_size * rl.group_size
    if rows % rl.minibatches:
        raise ConfigError(f"the rollout batch of {t.batch_size} prompts x rl.group_size={rl.group_size} = "
                          f"{rows} rows does not divide into rl.minibatches={rl.minibatches}")
    if (rows // rl.minibatches) % t.microbatches:
        raise ConfigError(f"a minibatch of {rows // rl.minibatches} rows does not divide into "
                          f"train.microbatches={t.microbatches}")
    if not cfg.optim.lr > 0:   # the value head's rate is rl.value_lr on optim's schedule (its shape)
        raise ConfigError(f"RL trains with optim.lr > 0, got {cfg.optim.lr}")
    if not cfg.checkpoint.init_from:
        raise ConfigError("RL starts from a policy: set checkpoint.init_from to an SFT run (or an HF dir)")


def load_reward_model(path: str, cfg: Config, tokenizer, run: Run, step: int | None = None):
    """A frozen reward model (a reward run dir or an HF *ForSequenceClassification dir; its
    newest checkpoint, or `step`) placed on the run's mesh -> (a jitted (batch) -> (B,) scores
    at each row's last real token, its scalar head {"kernel": (d,)}, its identity {path, step,
    checksum} for the run's checkpoints). Its vocabulary must be the policy's: it reads the
    policy's token ids."""
    import pathlib

    from jaxllm.data.tokenizer import fingerprint, load_tokenizer
    from jaxllm.evaluation.source import model_config, tokenizer_path
    from jaxllm.objectives.reward import score
    from jaxllm.parallel import rules as rules_lib
    from jaxllm.training.checkpoint import load_params, params_checksum, source_model_config, source_step
    from jaxllm.training.reward import init_reward_params, reward_param_specs, source_has_reward_head
    if not source_has_reward_head(path):
        raise ConfigError(f"rl.reward_model={path} is not a reward model (train one with "
                          f"train.objective=reward, or give an HF *ForSequenceClassification dir)")
    rm_cfg = model_config(source_model_config(path), path)
    if rm_cfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"rl.reward_model={path} has a vocabulary of {rm_cfg.vocab_size} ids but the "
                          f"policy has {cfg.model.vocab_size}: the reward model must read the policy's tokens")
    try:
        rm_tok = load_tokenizer(tokenizer_path(pathlib.Path(path)))
    except Exception as e:  # noqa: BLE001 - an RM without a findable tokenizer: the sizes matched
        rm_tok = None
        run.log(f"note: rl.reward_model={path}: its tokenizer cannot be read ({str(e).splitlines()[0][:160]}), so "
                f"only its vocabulary size is checked against the policy's")
    if rm_tok is not None and fingerprint(rm_tok) != fingerprint(tokenizer):
        raise ConfigError(f"rl.reward_model={path} was trained with another tokenizer ({rm_tok.path}) "
                          f"than the policy's ({tokenizer.path}): its scores would read other words")
    specs = reward_param_specs(rm_cfg)
    shapes = jax.eval_shape(lambda: init_reward_params(rm_cfg, jax.random.key(0)))
    sh = rules_lib.param_shardings(specs, shapes, run.rules, run.mesh)
    step = source_step(path) if step is None else step
    params, _ = load_params(path, jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sh), step=step)
    run.log(f"reward model: {path}" + (f" step {step}" if step is not None else "")
            + f" ({sum(x.size for x in jax.tree.leaves(params)):,} parameters, frozen)")
    fn = jax.jit(lambda p, b: score(p, b["tokens"], b["segment_ids"], rm_cfg, positions_nt=b["positions"]))
    ident = {"path": str(pathlib.Path(path).absolute()), "step": step, "checksum": params_checksum(params)}
    return (lambda batch: local_rows(fn(params, batch))), params["reward_head"], ident


class Scorer:
    """Scores of responses: the reward model's scalar at each response's end-of-turn token, or
    the programmatic reward of the prompt's task (also the 'true' reward when tasks exist)."""

    def __init__(self, cfg: Config, tokenizer, run: Run):
        self.tok, self.cfg = tokenizer, cfg
        self.rm = self.rm_head = self.ident = None
        self.run = run
        if cfg.rl.reward_model:
            self.rm, self.rm_head, self.ident = load_reward_model(cfg.rl.reward_model, cfg, tokenizer, run)

    def keep_identity(self, meta: dict) -> None:
        """The reward model a run scores with is part of its trajectory, as its frozen base: a
        fresh run records it; a resumed one scores with the recorded checkpoint step (the reward
        run may have trained on since) and refuses a model whose params changed."""
        from jaxllm.training.checkpoint import CheckpointError
        if self.rm is None:
            return
        was = meta.get("reward_model")
        if was is None:
            meta["reward_model"] = self.ident
            return
        if was["path"] != self.ident["path"]:
            # the same rl.reward_model text from another directory, or a change accepted with
            # checkpoint.allow_config_change (the config check refuses it otherwise)
            if not self.cfg.checkpoint.allow_config_change:
                raise CheckpointError(f"{self.run.dir} scored with the reward model {was['path']}; rl.reward_model="
                                      f"{self.cfg.rl.reward_model} is {self.ident['path']} from here: resume from the "
                                      f"directory it started in, give the recorded path, or set "
                                      f"checkpoint.allow_config_change=true to score with this one")
            self.run.log(f"reward model: now {self.ident['path']} (was {was['path']}; "
                         f"checkpoint.allow_config_change=true)")
            meta["reward_model"] = self.ident
            return
        if was.get("step") != self.ident["step"]:
            self.run.log(f"reward model: {was['path']} has trained on since; scoring with step {was.get('step')}, "
                         f"as this run did")
            self.rm, self.rm_head, self.ident = load_reward_model(
                self.cfg.rl.reward_model, self.cfg, self.tok, self.run, step=was.get("step"))
        if not np.allclose(self.ident["checksum"], was["checksum"], rtol=1e-5, atol=0):
            raise CheckpointError(f"{self.run.dir}: its reward model {was['path']}"
                                  + (f" step {was['step']}" if was.get("step") is not None else "")
                                  + f" is not the model it was trained with (params checksum {self.ident['checksum']} "
                                  f"vs {was['checksum']} recorded): restore that model there, or start a new run")

    @staticmethod
    def true_rewards(records: list[dict], texts: list[str]) -> np.ndarray | None:
        """The synthetic tasks' programmatic scores, or None unless every record has such a
        task (a 'task' of another schema is the user's own field, not graded here)."""
        from jaxllm.data.synthetic_tasks import score_response, task_problem
        if not all("task" in r and task_problem(r["task"]) is None for r in records):
            return None
        return np.asarray([score_response(r["task"], x) for r, x in zip(records, texts)], np.float32)

    def __call__(self, batch: dict, records: list[dict], texts: list[str]) -> np.ndarray:
        if self.rm is not None:
            return np.asarray(self.rm(batch), np.float32)
        true = self.true_rewards(records, texts)
        if true is None:
            raise ConfigError("rl.reward_model is empty and the prompts carry no 'task' for the "
                              "programmatic reward: give a reward-model run dir")
        return true


def train(cfg: Config) -> dict:
    t, rl = cfg.train, cfg.rl
    _check(cfg)
    # the same LoRA/adapter choice (and QLoRA base) as SFT
    from jaxllm.training.pretrain import _delta, _delta_meta, frozen_layout, load_frozen_base
    with Run(cfg) as run:
        shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
        per_micro = t.batch_size * rl.group_size // rl.minibatches // t.microbatches
        if per_micro % shards or (t.batch_size * rl.group_size) % shards:
            raise ConfigError(f"{per_micro} rows per microbatch (train.batch_size x rl.group_size / "
                              f"rl.minibatches / train.microbatches) must be divisible by mesh "
                              f"data*fsdp = {shards}")
        tok = load_tokenizer_for(cfg.data, cfg.model.vocab_size)
        delta = _delta(cfg, tok)
        stops = _stop_ids(tok)
        scan_kw = dict(strict=cfg.data.strict, drop_long=cfg.data.long_examples == "drop", log=run.log,
                       need_task=not rl.reward_model)   # the programmatic reward grades each record's task
        prompts = R.prompt_iterator(cfg.data.sources, tok, template=cfg.data.chat_template,
                                    max_tokens=rl.max_prompt_tokens, global_batch=t.batch_size, seed=t.seed,
                                    **scan_kw)
        scorer = Scorer(cfg, tok, run)
        base_specs, base_shapes = param_logical_axes(cfg.model), param_shapes(cfg.model)
        vh_specs = {"kernel": jax.sharding.PartitionSpec("embed"), "bias": jax.sharding.PartitionSpec()}
        # optim.* counts optimizer updates: rl.epochs * rl.minibatches per iteration
        per_it = rl.epochs * rl.minibatches

        def horizon(h):   # Run hands over iterations (train.steps) unless optim.decay_steps is set
            return h if cfg.optim.decay_steps else h * per_it
        if delta is None:
            def init_fn(k):
                return {**init_params(cfg.model, k), "value_head": init_value_head(cfg.model.d_model)}
            specs = {**base_specs, "value_head": vh_specs}
            frozen_kw = dict(frozen_specs=base_specs, frozen_shapes=base_shapes)   # the reference copy

            def merge(trainable, frozen):
                return trainable
        else:
            module, dcfg = delta

            def init_fn(k):
                return {"delta": module.init_delta(base_shapes, dcfg, k),
                        "value_head": init_value_head(cfg.model.d_model)}
            specs = {"delta": module.delta_logical_axes(cfg.model, dcfg), "value_head": vh_specs}
            frozen_specs, frozen_shapes = frozen_layout(cfg, base_specs, base_shapes)   # QLoRA: quantized
            frozen_kw = dict(frozen_specs=frozen_specs, frozen_shapes=frozen_shapes)
            attach = module.make_merge(dcfg)

            def merge(trainable, frozen):
                return {**attach(trainable["delta"], frozen), "value_head": trainable["value_head"]}
        state, shardings, optimizer, meta, resumed = run.start_state(
            init_fn=init_fn, param_specs=specs, make_optimizer=lambda h: make_optimizer(
                cfg.optim, horizon(h), lr_scales={"value_head": rl.value_lr / cfg.optim.lr}),
            meta={"rl": {"iteration": 0, "kl_coef": rl.kl_coef},
                  "delta": _delta_meta(delta, cfg.checkpoint.init_from)},
            data_iter=prompts, init_from_trainable=False, **frozen_kw)
        scorer.keep_identity(meta)
        # the frozen tree: the reference policy (full) or the base the delta adapts (LoRA)
        frozen = load_frozen_base(run, base_specs, base_shapes, shardings.frozen, meta)
        if resumed is None and delta is None:   # the policy starts as the reference
            state = state.replace(params={**jax.tree.map(jnp.copy, frozen), "value_head": state.params["value_head"]})
        if resumed is None and rl.value_init == "reward_model":
            state = state.replace(params={**state.params, "value_head": _value_head_from(scorer.rm_head, state, run)})
        if t.objective == "grpo":   # beta comes with each batch (kl_coef): adaptive under rl.kl_target
            loss_fn = make_grpo_loss(cfg.model, clip=rl.clip, beta=rl.kl_coef, temperature=rl.temperature)
        else:
            loss_fn = make_ppo_loss(cfg.model, clip=rl.clip, value_clip=rl.value_clip, vf_coef=rl.vf_coef,
                                    entropy_coef=rl.entropy_coef, temperature=rl.temperature)
        step_fn = make_train_step(loss_fn, optimizer, shardings, microbatches=t.microbatches, merge=merge,
                                  optimizer_metrics=skip_metrics(
                                      lr_schedule(cfg.optim, horizon(meta["schedule_steps"]))), **run.step_options())
        eval_prompts = None
        if bool(t.eval_every) != bool(cfg.data.eval_sources):
            run.log("note: train.eval_every=0, so data.eval_sources are not read" if cfg.data.eval_sources else
                    "note: data.eval_sources is empty, so there are no held-out answers (train.eval_every is ignored)")
        if t.eval_every and cfg.data.eval_sources:
            it = R.prompt_iterator(cfg.data.eval_sources, tok, template=cfg.data.chat_template,
                                   max_tokens=rl.max_prompt_tokens, global_batch=t.batch_size, seed=t.seed,
                                   shuffle=False, repeat=False, label="eval", **scan_kw)
            eval_prompts = [next(it, None) for _ in range(t.eval_batches or 4)]
            eval_prompts = [b for b in eval_prompts if b]   # read once, at start-up
        loop = _Loop(cfg, run, tok, stops, scorer, merge, frozen, shardings, delta is not None)
        loop.eval_prompts = eval_prompts
        return loop.train(state, step_fn, prompts, meta, resumed)


def _local(gen):
    """A Generation of global arrays -> this process's rows, on the host."""
    return type(gen)(*(local_rows(x) for x in gen))


def _value_head_from(rm_head: dict, state, run: Run) -> dict:
    """The critic's head as the reward model's scalar head (bias 0), in the value head's
    shardings and dtypes."""
    vh = state.params["value_head"]
    if rm_head["kernel"].shape != vh["kernel"].shape:
        raise ConfigError(f"rl.value_init=reward_model: the reward model's head has shape "
                          f"{tuple(rm_head['kernel'].shape)} but the policy's value head {tuple(vh['kernel'].shape)} "
                          f"(the two models' d_model differ)")
    run.log("value head: initialised from the reward model's head")
    # a copy: the step donates the state, and the reward model keeps scoring with its own head
    # (a shared buffer was deleted by iteration 1's update; iteration 2 then failed)
    kernel = jnp.array(rm_head["kernel"], dtype=vh["kernel"].dtype, copy=True)
    return {"kernel": jax.device_put(kernel, vh["kernel"].sharding),
            "bias": jnp.zeros_like(vh["bias"])}


class _Loop:
    def __init__(self, cfg, run, tok, stops, scorer, merge, frozen, shardings, has_delta):
        self.cfg, self.run, self.tok, self.stops, self.scorer = cfg, run, tok, stops, scorer
        self.merge, self.frozen, self.sh, self.has_delta = merge, frozen, shardings, has_delta
        rl = cfg.rl
        self.kl = AdaptiveKL(rl.kl_coef, rl.kl_target, rl.kl_horizon) if rl.kl_target > 0 else None
        self.eval_prompts = None
        mc = cfg.model
        # vocab_limit: a model vocabulary padded beyond the tokenizer's never samples a non-token
        self._generate = functools.partial(
            generate, model_cfg=mc, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
            top_k=rl.top_k, top_p=rl.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=stops,
            vocab_limit=tok.vocab_size)

        @jax.jit
        def score_pass(trainable, frozen, batch):
            policy = merge(trainable, frozen)
            ref = reference_params(policy) if has_delta else frozen
            out = policy_outputs(policy, batch, mc, temperature=rl.temperature, values=True)
            ref_lp = policy_outputs(ref, batch, mc, temperature=rl.temperature)["logprob"]
            return out["logprob"], out["value"], ref_lp
        self._score_pass = score_pass
        self._take = jax.jit(lambda b, idx: jax.tree.map(lambda x: x[idx], b), out_shardings=shardings.batch)

    def evaluate(self, state) -> dict:
        """The held-out prompts answered greedily and sampled (at rl.temperature, a fixed key):
        mean score, and the true reward when the prompts carry tasks."""
        policy = {k: v for k, v in self.merge(state.params, self.frozen).items() if k != "value_head"}
        out = {}
        for tag, temperature in (("", 0.0), ("_sampled", self.cfg.rl.temperature)):
            scores, reals, trues, true_reals = [], [], [], []
            for rows in self.eval_prompts:
                toks, mask = self._pad_prompts(rows)
                g = to_global_batch({"t": toks, "m": mask}, self.sh.batch.mesh, self.sh.batch.spec)
                gen = _local(self._generate(policy, g["t"], key=jax.random.key(0), prompt_mask=g["m"],
                                            temperature=temperature))
                texts = R.response_texts(self.tok, gen, self.stops)
                batch = to_global_batch(R.rollout_batch(gen), self.sh.batch.mesh, self.sh.batch.spec)
                real = np.asarray([not r["pad"] for r in rows])   # the last batch's filler rows: not counted
                records = [r["record"] for r in rows]
                scores.append(np.asarray(self.scorer(batch, records, texts)))
                reals.append(real)
                true = self.scorer.true_rewards(records, texts)
                if on_every_process(true is not None):   # every process's rows carry tasks
                    trues.append(true)
                    true_reals.append(real)
            # means over every process's real rows
            out[f"eval_score{tag}"] = global_mean(np.concatenate(scores), np.concatenate(reals))
            if trues:
                out[f"eval_true_reward{tag}"] = global_mean(np.concatenate(trues), np.concatenate(true_reals))
        return out

    def _pad_prompts(self, rows: list[dict]):
        p = self.cfg.rl.max_prompt_tokens
        toks = np.full((len(rows), p), self.tok.pad_id, np.int32)
        mask = np.zeros((len(rows), p), np.int32)
        for i, r in enumerate(rows):
            ids = r["ids"]
            toks[i, p - len(ids):], mask[i, p - len(ids):] = ids, 1
        return toks, mask

    def iteration(self, state, step_fn, prompt_rows: list[dict], it: int) -> tuple:
        rl, t = self.cfg.rl, self.cfg.train
        timing = {}
        t0 = time.perf_counter()
        rows = R.repeat_prompts(prompt_rows, rl.group_size)
        toks, mask = self._pad_prompts(rows)
        g = to_global_batch({"t": toks, "m": mask}, self.sh.batch.mesh, self.sh.batch.spec)
        policy = self.merge(state.params, self.frozen)
        key = jax.random.fold_in(jax.random.key(t.seed), it)
        gen = self._generate({k: v for k, v in policy.items() if k != "value_head"}, g["t"], key=key,
                             prompt_mask=g["m"])
        gen = _local(gen)   # this process's rows
        timing["rollout_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = R.response_texts(self.tok, gen, self.stops)
        host = R.rollout_batch(gen)
        batch = to_global_batch(host, self.sh.batch.mesh, self.sh.batch.spec)
        records = [r["record"] for r in rows]
        done = R.ended(gen, self.stops)
        # a penalty >= 0 for running out of tokens; the scores of every process's rows, as the batch
        local_scores = self.scorer(batch, records, texts) - rl.missing_eos_penalty * (~done)
        scores = to_global_batch({"s": local_scores.astype(np.float32)}, self.sh.batch.mesh,
                                 self.sh.batch.spec)["s"]
        timing["score_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        old_lp, old_v, ref_lp = self._score_pass(state.params, self.frozen, batch)
        m = batch["response_mask"]
        beta = self.kl.beta if self.kl is not None else rl.kl_coef
        kl_bt = kl_estimate(old_lp, ref_lp, rl.kl_estimator) * m
        if t.objective == "grpo":
            adv_b = group_advantages(scores.reshape(-1, rl.group_size)).reshape(-1)
            adv = adv_b[:, None] * m
            # this iteration's beta per row: the adaptive beta reaches the loss without a recompile
            extra = {"ref_logprobs": ref_lp, "kl_coef": jnp.full_like(adv_b, beta, jnp.float32)}
            returns = None
        else:
            rewards = per_token_rewards(scores, kl_bt, m, beta)
            adv, returns = gae(rewards, old_v, m, gamma=rl.gamma, lam=rl.lam)
            if rl.whiten_advantages:
                adv = masked_whiten(adv, m)
            extra = {"old_values": old_v, "returns": returns}
        jax.block_until_ready((adv, kl_bt))   # the timings below measure work, not dispatch
        timing["ref_value_s"] = time.perf_counter() - t0
        train_batch = dict(batch, old_logprobs=old_lp, advantages=adv, **extra)
        t0 = time.perf_counter()
        step_metrics = []
        n_rows = len(rows) * jax.process_count()
        for epoch in range(rl.epochs):
            order = R.batches_of(n_rows, rl.minibatches, jax.random.fold_in(key, 1000 + epoch))
            for idx in order:
                mb = self._take(train_batch, idx)   # host indices, the same on every process
                state, sm = step_fn(state, mb, self.frozen)
                step_metrics.append(sm)
        jax.block_until_ready(state)
        timing["update_s"] = time.perf_counter() - t0
        sm = {k: float(np.mean([float(s[k]) for s in step_metrics])) for k in step_metrics[0]}
        seq_kl = jnp.sum(kl_estimate(old_lp, ref_lp, "k1") * m, axis=1)
        mean_length = global_mean(np.asarray(gen.mask).sum(1))   # over every process's rows
        metrics = {"score": float(jnp.mean(scores)), "kl": float(jnp.mean(seq_kl)), "kl_coef": beta,
                   "response_length": mean_length, "ended_fraction": global_mean(done),
                   **({"entropy": sm["entropy"]} if "entropy" in sm else {}),   # GRPO's loss has none
                   "clipfrac": sm["clipfrac"],
                   "pg_loss": sm["pg_loss"], "loss": sm["loss"], "lr": sm.get("lr", 0.0),
                   "skipped_updates": sm.get("skipped_updates", 0.0),
                   "rollout_tokens_per_s": mean_length * n_rows / timing["rollout_s"], **timing}
        if "approx_kl" in sm:
            metrics.update(approx_kl=sm["approx_kl"], vf_loss=sm["vf_loss"], vf_clipfrac=sm["vf_clipfrac"],
                           explained_variance=float(R.explained_variance(old_v, returns, m)),
                           value_mean=float(masked_mean(old_v, m)))
        true = self.scorer.true_rewards(records, texts)
        if on_every_process(true is not None):   # the same choice everywhere: global_mean is a collective
            metrics["true_reward"] = global_mean(true)
        if self.kl is not None:
            self.kl.update(metrics["kl"], n_rows)   # the global batch: beta moves alike on any process count
        return state, metrics

    def train(self, state, step_fn, prompts, meta: dict, resumed) -> dict:
        run, t = self.run, self.cfg.train
        it = int(meta["rl"]["iteration"]) if resumed is not None else 0
        if self.kl is not None:
            self.kl.beta = float(meta["rl"]["kl_coef"])
        history = []
        if it >= t.steps:
            run.log(f"{run.dir} already finished at iteration {it}; raise train.steps to continue it")
        preempted = False
        if self.eval_prompts and it == 0 and it < t.steps:   # the starting policy, for comparison
            e = self.evaluate(state)
            run.writer.write(0, e)
            run.log("iteration 0: held-out greedy " + " ".join(f"{k} {v:.3f}" for k, v in e.items()))
        if it < t.steps:
            run.log_host_alloc()
        run.guard.start(run.checkpointer, it)
        while it < t.steps:
            state, m = self.iteration(state, step_fn, next(prompts), it)
            it += 1
            history.append(dict(step=it, **m))
            run.writer.write(it, m)
            run.lock.heartbeat()
            run.log(f"iteration {it}: score {m['score']:.3f} kl {m['kl']:.3f}"
                    + (f" true {m['true_reward']:.3f}" if "true_reward" in m else "")
                    + f" len {m['response_length']:.1f}")
            if self.eval_prompts and (it % t.eval_every == 0 or it == t.steps):
                e = self.evaluate(state)
                run.writer.write(it, e)
                history[-1].update(e)
                run.log(f"iteration {it}: held-out greedy " + " ".join(f"{k} {v:.3f}" for k, v in e.items()))
            meta["rl"] = {"iteration": it, "kl_coef": self.kl.beta if self.kl is not None else self.cfg.rl.kl_coef}
            run.checkpointer.save(it, state, prompts, meta)
            if run.guard.should_stop(run.checkpointer, it):
                preempted = True
                break
        run.checkpointer.save(it, state, prompts, meta, force=True)
        if run.is_main:
            run.log(plot_curves(run.dir))
        return {"run_dir": str(run.dir), "steps": it, "preempted": preempted, "resumed_from": resumed,
                "history": history, "state": state, "frozen": self.frozen,
                "first_loss": history[0]["loss"] if history else None,
                "final_loss": history[-1]["loss"] if history else None,
                "eval": next(({k: h[k] for k in h if k.startswith("eval_")} for h in history[::-1]
                              if "eval_score" in h), None)}


CURVES = "curves.png"


def plot_curves(run_dir) -> str:
    """curves.png in the run dir from its whole metrics.jsonl (a resumed run included): the
    score (and the true reward where the prompts carry tasks), the KL to the reference and the
    policy's entropy per iteration. -> one line saying what was written, or why nothing was."""
    import pathlib

    from jaxllm.training.metrics import read_metrics
    has = (pathlib.Path(run_dir) / "metrics.jsonl").exists()
    rows = [r for r in read_metrics(run_dir) if "kl" in r and "score" in r] if has else []
    if not rows:
        return f"no {CURVES}: {run_dir}/metrics.jsonl has no iterations"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no {CURVES}: matplotlib is not installed (pip install 'jaxllm[curate]')"
    step = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(step, [r["score"] for r in rows], label="score (sampled)")
    if all("true_reward" in r for r in rows):
        axes[0].plot(step, [r["true_reward"] for r in rows], label="true reward (sampled)")
    axes[0].legend(fontsize=8)
    for ax, key, title in ((axes[0], None, "reward"), (axes[1], "kl", "KL to the reference (per response)"),
                           (axes[2], "entropy", "policy entropy (per token)")):
        if key and not any(key in r for r in rows):
            title += ": not computed (GRPO)"
        elif key:
            ax.plot(step, [r.get(key, float("nan")) for r in rows])
        ax.set_title(title)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    out = pathlib.Path(run_dir) / CURVES
    fig.savefig(out.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    out.with_suffix(".tmp.png").replace(out)
    return f"wrote {out} ({len(rows)} iterations)"
