"""Recipe: a reward model from ranked responses (train.objective=reward; InstructGPT's RM).

    summary = train(cfg)                   # what `jaxllm train configs/reward/tiny.yaml` runs
    summary = train(cfg, batches=my_iter)  # your own (B_local, K, T) batches instead of cfg.data
    export_hf("runs/reward-tiny", "exports/rm")   # -> LlamaForSequenceClassification (or Qwen2)

The model is the transformer trunk with a scalar head (model/heads.py `reward_head`) read at
each response's last real token, its end-of-turn. The LM head is not part of the tree: it is
never used, trained or exported. checkpoint.init_from (an SFT run, any LM run or checkpoint,
an HF *ForCausalLM dir) gives the trunk and the head starts at zero; an init_from that already
has a reward head (a reward run, an exported *ForSequenceClassification) gives both.
Run setup (training/run.py), the step and the loop (training/loop.py) are the shared ones.
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp

from jaxllm.config import CheckpointConfig, Config, ModelConfig
from jaxllm.configlib import ConfigError
from jaxllm.data.pipeline import closing_batches, to_global_batch
from jaxllm.model.api import init_params, param_logical_axes
from jaxllm.model.heads import REWARD_HEAD_AXES, init_reward_head
from jaxllm.objectives.reward import make_reward_loss
from jaxllm.parallel import rules as rules_lib
from jaxllm.training import metrics as metrics_lib
from jaxllm.training.checkpoint import Checkpointer, is_hf_dir, load_params
from jaxllm.training.loop import fit
from jaxllm.training.optim import lr_schedule, make_optimizer, skip_metrics
from jaxllm.training.run import Run
from jaxllm.training.step import make_eval_step, make_train_step


# ---------------------------------------------------------------------------- the model
def init_reward_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """The trunk's params (no lm_head) + "reward_head" (zeros)."""
    params = init_params(cfg, key)
    params.pop("lm_head", None)
    params["reward_head"] = init_reward_head(cfg)
    return params


def reward_param_specs(cfg: ModelConfig) -> dict:
    specs = param_logical_axes(cfg)
    specs.pop("lm_head", None)
    specs["reward_head"] = dict(REWARD_HEAD_AXES)
    return specs


def source_has_reward_head(path: str | pathlib.Path) -> bool:
    """Whether checkpoint.init_from holds a reward model (a reward run, or an HF
    *ForSequenceClassification) rather than a language model."""
    path = pathlib.Path(path)
    if is_hf_dir(path):
        from jaxllm.interop.hf import hf_head
        return hf_head(json.loads((path / "config.json").read_text())) == "reward"
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return False   # load_params names the problem
    ck = Checkpointer(root, CheckpointConfig(), read_only=True)
    try:   # what the params hold, not the objective: an HF reward model converted to orbax has none
        step = ck.latest_step()
        if step is None:
            return False   # load_params names the problem
        try:
            return "reward_head" in ck.saved_params_metadata(step)
        except Exception:  # noqa: BLE001 - metadata is best-effort: the run's objective then says
            return ck.read_meta(step).get("config", {}).get("train", {}).get("objective") == "reward"
    finally:
        ck.close()


class RewardRun(Run):
    """Run whose init_from may be a language model: its trunk is loaded (straight into this
    run's shardings) and the new reward head is added, initialised to zeros."""

    def load_init_from(self, abstract_params):
        src = self.cfg.checkpoint.init_from
        if source_has_reward_head(src):
            self.log(f"init_from {src} is a reward model: trunk and reward head both loaded")
            return super().load_init_from(abstract_params)
        lm_abstract = {k: v for k, v in abstract_params.items() if k != "reward_head"}
        if is_hf_dir(pathlib.Path(src)) and not self.cfg.model.tie_embeddings:
            # an HF file is read whole (tensor by tensor): lm_head needs a place, then goes
            cfg = self.cfg.model
            shape = {"kernel": jax.ShapeDtypeStruct((cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))}
            sh = rules_lib.param_shardings(param_logical_axes(cfg)["lm_head"], shape, self.rules, self.mesh)
            lm_abstract["lm_head"] = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shape, sh)
        params = dict(super().load_init_from(lm_abstract))
        params.pop("lm_head", None)
        params["reward_head"] = jax.tree.map(
            lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract_params["reward_head"])
        self.log("reward head: new, initialised to zeros (the LM head of init_from is not used)")
        return params


# ---------------------------------------------------------------------------- data
def data_iterators(cfg: Config, log):
    """(train iterator, eval-iterator factory or None, tokenizer) of this process's rows.
    Both scans run here, at start-up, so data errors appear before any training."""
    from jaxllm.data import pipeline, preference
    t = cfg.train
    tok = pipeline.load_tokenizer_for(cfg.data, cfg.model.vocab_size)
    kw = dict(seq_len=t.seq_len, global_batch_size=t.batch_size, seed=cfg.data.seed, k_max=cfg.reward.k_max,
              tokenizer=tok)
    train_it = preference.make_train_iterator(cfg.data, **kw)
    if t.eval_every and not cfg.data.eval_sources:
        log("note: data.eval_sources is empty, so there is no held-out evaluation (train.eval_every is ignored)")
    if cfg.data.eval_sources and not t.eval_every:
        log("note: train.eval_every=0, so data.eval_sources are not read (no held-out evaluation)")
    if not (t.eval_every and cfg.data.eval_sources):
        return train_it, None, tok
    # train.eval_batches=0: data.eval_batches decides (0 = every held-out ranking)
    make_eval = functools.partial(preference.make_eval_iterator, cfg.data, num_batches=t.eval_batches or None,
                                  **kw)
    make_eval().close()
    return train_it, make_eval, tok


def evaluate(eval_step, params, make_eval, batch_sharding) -> dict:
    """Held-out pair-weighted loss, ranking loss, pairwise accuracy and mean margin. The sums
    stay on the devices until the last batch (one host transfer)."""
    totals = None
    with closing_batches(make_eval()) as batches:
        for batch in batches:
            out = eval_step(params, to_global_batch(batch, batch_sharding.mesh, batch_sharding.spec), None)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    s = {k: float(v) for k, v in jax.device_get(totals).items()}
    w = max(s["weight"], 1.0)
    return {"eval_loss": s["loss"] / w, "eval_ranking_loss": s["ranking"] / w, "eval_accuracy": s["accuracy"] / w,
            "eval_margin": s["margin"] / w, "eval_pairs": s["weight"]}


# ---------------------------------------------------------------------------- the recipe
def check_config(cfg: Config, log, own_batches: bool = False) -> None:
    if cfg.train.objective != "reward":
        raise ConfigError(f"the reward recipe trains train.objective=reward, got {cfg.train.objective}")
    if not own_batches and cfg.data.kind != "chat":
        raise ConfigError(f"train.objective=reward reads rankings rendered as chats: set data.kind=chat "
                          f"(got data.kind={cfg.data.kind})")
    if cfg.lora.r or cfg.adapter.size:
        raise ConfigError("the reward recipe trains the full model: lora.r and adapter.size must be 0")
    if cfg.train.z_loss:
        raise ConfigError("train.z_loss regularises the LM head, which a reward model does not have; "
                          "set it to 0")
    if not cfg.checkpoint.init_from:
        log("note: reward model from a random init (checkpoint.init_from is empty; an SFT run is usual)")


def train(cfg: Config, batches: Iterator[dict] | None = None) -> dict:
    t, r = cfg.train, cfg.reward
    with RewardRun(cfg) as run:
        check_config(cfg, run.log, own_batches=batches is not None)
        run.check_layout()
        train_it, make_eval = None, None
        if batches is None or cfg.data.kind == "chat":
            train_it, make_eval, _ = data_iterators(cfg, run.log)
        if batches is not None:
            run.log("training on the batches passed to train(); cfg.data's iterator position is "
                    "not checkpointed")
        loss_fn = make_reward_loss(cfg.model, margin=r.margin, center_coef=r.center_coef)
        state, shardings, optimizer, meta, resumed = run.start_state(
            init_fn=lambda k: init_reward_params(cfg.model, k), param_specs=reward_param_specs(cfg.model),
            make_optimizer=lambda horizon: make_optimizer(cfg.optim, horizon),
            data_iter=None if batches is not None else train_it)
        step_fn = make_train_step(loss_fn, optimizer, shardings, microbatches=t.microbatches,
                                  optimizer_metrics=skip_metrics(lr_schedule(cfg.optim, meta["schedule_steps"])),
                                  **run.step_options())
        eval_step = make_eval_step(loss_fn, shardings=shardings)
        # no LM head: its 6 * d * vocab FLOPs per token are not spent
        flops = metrics_lib.flops_per_token(cfg.model, t.seq_len) - 6 * cfg.model.d_model * cfg.model.vocab_size
        return fit(run, state, step_fn, batches if batches is not None else train_it,
                   shardings=shardings, meta=meta,
                   data_iter=None if batches is not None else train_it,
                   evaluate=None if make_eval is None else
                   (lambda s: evaluate(eval_step, s.params, make_eval, shardings.batch)),
                   flops_per_token=flops, resumed_from=resumed)


# ---------------------------------------------------------------------------- export
def export_hf(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> str:
    """A reward run's newest params -> an HF *ForSequenceClassification directory that
    transformers loads, its pad id, eos and bos those of the run's tokenizer, whose files it carries."""
    from jaxllm.config import load_config
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.interop.hf import save_hf, save_tokenizer
    src = pathlib.Path(run_dir)   # a run dir, or its checkpoints/ (as checkpoint.load_policy takes it)
    run_dir = src if (src / "checkpoints").is_dir() else src.parent
    params, model = load_params(src)
    if "reward_head" not in params:
        raise ConfigError(f"{src} holds no reward head (not a reward run)")
    if not (run_dir / "config.yaml").is_file():   # e.g. `convert --to orbax` of an HF reward model
        raise ConfigError(f"{src}: exporting a reward model needs its run's config.yaml (its data.tokenizer "
                          f"gives the pad and eos ids transformers scores with); there is no "
                          f"{(run_dir / 'config.yaml').absolute()}")
    cfg = load_config(run_dir / "config.yaml")
    tok = load_tokenizer(cfg.data.tokenizer)
    ends = {i for i in (tok.eos_id, getattr(tok, "im_end_id", None)) if i is not None}
    if tok.pad_id in ends:
        raise ConfigError(f"the tokenizer's pad id {tok.pad_id} is also an end-of-turn/eos id: "
                          f"transformers could not find the scored token of an exported reward model")
    model = dict(model, rope_scaling=tuple(model.get("rope_scaling") or ()))
    save_hf(out_dir, ModelConfig(**model), params, head="reward", pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    save_tokenizer(out_dir, cfg.data.tokenizer)
    return f"wrote {out_dir} (reward model, pad_token_id={tok.pad_id}, with the tokenizer {cfg.data.tokenizer})"
