from jaxllm.model.api import (count_params, forward, hidden_states, init_params,  # noqa: F401
                              param_logical_axes, param_shapes, positions_from_segments)
