"""diffboost ops: each a torch.library custom op with a backend registry (see :mod:`diffboost.ops.registry`).

Importing this package registers the built-in ops. ``diffboost info`` lists, for each op, the backend that will run
here and why each faster one will not.
"""

from diffboost.ops.attention import attention, attention_reference
from diffboost.ops.linear_attention import linear_attention, linear_attention_reference
from diffboost.ops.registry import (
    Backend,
    BackendUnavailableError,
    Op,
    dispatch_log,
    get_op,
    registered_ops,
)
from diffboost.ops.w4a4 import w4a4_gemm, w4a4_linear, w4a4_quantize_act
from diffboost.ops.w4a16 import w4a16_linear

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Op",
    "attention",
    "attention_reference",
    "dispatch_log",
    "get_op",
    "linear_attention",
    "linear_attention_reference",
    "registered_ops",
    "w4a16_linear",
    "w4a4_gemm",
    "w4a4_linear",
    "w4a4_quantize_act",
]
