from jaxllm.model.api import (
                              count_params,
                              forward,
                              init_cache,
                              init_params,
                              param_logical_axes,
                              param_shapes,
                              positions_from_segments,
                              trunk,
                              unembed,
)
from jaxllm.model.heads import token_stats

__all__ = ["count_params", "forward", "init_cache", "init_params", "param_logical_axes", "param_shapes",
           "positions_from_segments", "trunk", "unembed", "token_stats"]
