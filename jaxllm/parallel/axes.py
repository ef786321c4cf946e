"""Names of logical axes and mesh axes, and the check of `mesh.rules` overrides.

Import-free (besides the error type) so that config.py can validate rules without importing
the sharding code (which imports config.py).
"""
from __future__ import annotations

import difflib

from jaxllm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm",
              "lora_rank", "adapter")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed",
                   "activation_heads", "activation_mlp", "activation_vocab")


def check_rule_overrides(rules: dict) -> None:
    """Reject misspelt logical names or mesh axes in `mesh.rules` with the closest valid one."""
    valid = PARAM_AXES + ACTIVATION_AXES
    for name, axes in rules.items():
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"mesh.rules: unknown logical axis '{name}'{hint} (valid: {list(valid)})")
        for ax in axes:
            if ax not in MESH_AXES:
                raise UserError(f"mesh.rules.{name}: unknown mesh axis '{ax}' (valid: {list(MESH_AXES)})")
