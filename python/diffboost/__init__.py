"""diffboost: GPU kernels and compression methods that make diffusers pipelines faster and smaller, in place.

    import diffboost
    diffboost.patch(pipe, attention="int8", cache=3)   # fused INT8-QK attention + DeepCache / block caching
    image = pipe(prompt).images[0]
    diffboost.unpatch(pipe)                   # the pipeline is exactly as it was
    diffboost.patch(pipe, quant="w4a4")       # W4A4 denoiser (SVDQuant-style), calibrated on generated inputs

Kernels are reachable directly too: :func:`diffboost.ops.attention`. ``diffboost info`` (or
``python -m diffboost info``) says which backend each op uses on this machine and why faster ones don't run.
"""

__version__ = "0.1.0"

from diffboost import cache, linear, ops, quant
from diffboost.cache import BlockCacheConfig, DeepCacheConfig, EncoderPropagationConfig
from diffboost.integrations.attention import AttentionConfig
from diffboost.integrations.linear_attention import LinearAttentionConfig
from diffboost.patching import is_patched, patch, unpatch
from diffboost.quant import W4A4Config, W4A4Linear

__all__ = [
    "AttentionConfig",
    "BlockCacheConfig",
    "DeepCacheConfig",
    "EncoderPropagationConfig",
    "LinearAttentionConfig",
    "W4A4Config",
    "W4A4Linear",
    "__version__",
    "cache",
    "is_patched",
    "linear",
    "ops",
    "patch",
    "quant",
    "unpatch",
]
