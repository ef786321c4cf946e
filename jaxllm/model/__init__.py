from jaxllm.model.api import (  # noqa: F401
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
from jaxllm.model.heads import token_stats  # noqa: F401
