"""Linear attention for U-Net pipelines (LinFusion): the module, LinFusion-layout checkpoints, distillation.

    import diffboost
    from diffboost.linear import distill

    result = distill(pipe, prompts, steps=2000, lr=1e-4, checkpoint_dir="linfusion-ckpt", save_every=500)
    diffboost.patch(pipe, linear_attention=diffboost.LinearAttentionConfig(weights=result.modules))
    # or, from disk (a LinFusion release or a checkpoint written above):
    diffboost.patch(pipe, linear_attention=diffboost.LinearAttentionConfig(weights="linfusion-ckpt/step-002000"))

The op itself is :func:`diffboost.ops.linear_attention`.
"""

from diffboost.linear.distill import DistillResult, distill, latest_checkpoint
from diffboost.linear.modules import GeneralizedLinearAttention, LinearAttentionModules, self_attentions

__all__ = [
    "DistillResult",
    "GeneralizedLinearAttention",
    "LinearAttentionModules",
    "distill",
    "latest_checkpoint",
    "self_attentions",
]
