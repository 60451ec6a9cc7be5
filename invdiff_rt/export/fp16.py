"""fp32 islands in fp16 graphs: the numerically fragile ops run in fp32, everything else in fp16.

Kept in fp32 (as ONNX Runtime's and TensorRT's SD recipes do; `shared/reference/runtime_anchors.md` section 4):
- attention scores and softmax (UNet and VAE `Attention`: Q.K^T and softmax; CLIP: softmax): fp16 logits
  overflow (max 65504) and the exp-sum loses the small probabilities, the known cause of black SD 2.x images;
- GroupNorm (exported as InstanceNormalization) and LayerNorm: the variance of large activations overflows fp16
  and a tiny variance underflows, giving inf/NaN at the first norm after a large residual.
The adapter is left as is (its weights are TensorRT refit targets with fixed dtypes; its shift and the CFG combine
are computed in fp32 by `FusedDenoiser` anyway).
"""

from __future__ import annotations

import torch

FP32_OPS = {  # ONNX op -> why it stays fp32
    "Softmax": "attention softmax: fp16 logits overflow and the exp-sum loses small probabilities (black images)",
    "InstanceNormalization": "GroupNorm: the variance of large activations overflows fp16 (NaN)",
    "LayerNormalization": "LayerNorm: the same overflow/underflow of the variance in the text encoder and UNet",
}


def _fp32_norm(norm: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run a norm in fp32 on a low-precision activation and hand back `dtype` (hooks keep the parameter names)."""
    norm.float()
    norm.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))
    norm.register_forward_hook(lambda m, args, out: out.to(dtype))


def _fp32_attention(module: torch.nn.Module) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor

    if isinstance(module, Attention):
        module.upcast_attention = module.upcast_softmax = True
        module.set_processor(AttnProcessor())  # the classic processor honours the upcast flags (SDPA does not)


def fp32_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                   is_causal: bool | None = None, **kwargs):
    """transformers attention function: scores, mask and softmax in fp32, the weighted sum in the input dtype
    (transformers' own eager attention computes the scores in fp16 and its softmax exports as fp16). A causal
    module without a mask (CLIP's text encoder in transformers 5 passes `is_causal=True` and no mask) gets the
    causal mask here, as transformers' SDPA attention does: without it every token read every other one."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    elif (getattr(module, "is_causal", False) if is_causal is None else is_causal) and query.shape[2] > 1:
        q, k = query.shape[2], key.shape[2]
        future = torch.ones(q, k, dtype=torch.bool, device=scores.device).triu(k - q + 1)
        scores = scores.masked_fill(future, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _fp32_text_attention(module: torch.nn.Module) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("invdiff_fp32", fp32_attention)
    module.set_attn_implementation("invdiff_fp32")


def keep_fragile_ops_fp32(module: torch.nn.Module, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """In place: norms and attention scores/softmax in fp32 inside a `dtype` (fp16) module."""
    if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
        _fp32_text_attention(module)
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            _fp32_norm(m, dtype)
        _fp32_attention(m)
    return module
