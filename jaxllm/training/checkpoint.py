"""Checkpoints through orbax's CheckpointManager: async saves, retention, exact resume.

One checkpoint holds three items:
  state   the TrainState (trainable params, optimizer state, step, PRNG key data),
  data    the grain iterator state (so the resumed run reads the next batch it would have),
  meta    JSON: the model config and any objective controller state (e.g. an adaptive KL coef).
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
save killed midway is never listed: resume falls back to the previous complete one.
Restores go straight into target shardings, so a checkpoint saved on one mesh loads onto
another mesh shape or device count without gathering the model on one host.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.config import CheckpointConfig
from jaxllm.errors import RunError


class CheckpointError(RunError):
    pass


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _diff_shapes(saved, target, prefix="") -> list[str]:
    """Human-readable differences between saved metadata and the target pytree."""
    out = []
    flat_saved = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    flat_target = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    for k in sorted(set(flat_saved) | set(flat_target)):
        s, t = flat_saved.get(k), flat_target.get(k)
        if s is None:
            out.append(f"{prefix}{k}: missing from the checkpoint")
        elif t is None:
            out.append(f"{prefix}{k}: in the checkpoint but not in this run")
        elif tuple(getattr(s, "shape", ())) != tuple(t.shape):
            out.append(f"{prefix}{k}: checkpoint shape {tuple(s.shape)} vs run shape {tuple(t.shape)}")
    return out


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig):
        self.directory = pathlib.Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
        """Start a save of `step` (async unless configured otherwise). Returns whether it saved."""
        if not force and not (self.cfg.every and step % self.cfg.every == 0):
            return False
        if step in self.manager.all_steps():
            return False
        _check_finite(state)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            import grain
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self):
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """jax's multi-host preemption sync point (all hosts agree on the step)."""
        return self.manager.reached_preemption(step)

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, target_state, data_iter=None, step: int | None = None):
        """Restore into `target_state`'s shapes and shardings. -> (state, meta dict)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        self._check_compatible(step, target_state)
        items = {"state": ocp.args.StandardRestore(_abstract(target_state)),
                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            import grain
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; name the checkpoint in every case
            raise CheckpointError(f"cannot restore {self.directory}/{step}: {type(e).__name__}: {e}") from e
        return out["state"], dict(out["meta"] or {})

    def _check_compatible(self, step: int, target_state):
        """Compare saved parameter shapes with this run's before restoring, so the error
        names every tensor that differs (orbax would stop at the first)."""
        try:
            md = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
            saved = md.item_metadata.tree["params"]
        except Exception:  # metadata is best-effort; the restore itself still validates
            return
        diffs = _diff_shapes(saved, target_state.params, prefix="params")
        if diffs:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this run "
                                  f"(another model shape?): " + "; ".join(diffs[:6])
                                  + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""))

    def close(self):
        self.manager.close()


def _check_finite(state) -> None:
    """Never write a non-finite parameter: it would poison every resume."""
    leaves = jax.tree.leaves(state.params)
    bad = [i for i, x in enumerate(leaves) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
           and not bool(jax.numpy.all(jax.numpy.isfinite(x)))]
    if bad:
        raise CheckpointError(f"refusing to save: {len(bad)} parameter tensors are non-finite")


def load_params(path: str | pathlib.Path, shardings: Any | None = None):
    """Params only, from a run dir (its checkpoints/), a checkpoint dir, or an HF directory.
    -> (params, model config dict or None). `shardings` places the params when given."""
    path = pathlib.Path(path)
    if (path / "config.json").exists() and any(path.glob("*.safetensors*")):
        from jaxllm.interop.hf import load_hf
        cfg, params = load_hf(path, shardings=shardings)
        return params, dataclasses.asdict(cfg)
    root = path / "checkpoints" if (path / "checkpoints").exists() else path
    if not root.exists():
        raise CheckpointError(f"{path}: not a run dir, orbax checkpoint dir or HF model dir")
    mngr = ocp.CheckpointManager(root.absolute(), options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0))
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no complete checkpoint under {root}")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
    params = out["state"]["params"]
    if shardings is not None:
        params = jax.tree.map(jax.device_put, params, shardings)
    return params, (out["meta"] or {}).get("model")
