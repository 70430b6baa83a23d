"""Inference-only fused window attention for timm SwinV2 (same math, fewer memory passes).

timm's WindowAttention materialises the [windows*B, heads, N, N] attention matrix and walks it several
times (scale, + bias, + mask, softmax, @ v), and recomputes the continuous relative-position bias MLP on
every forward. For inference the bias depends only on the weights, so it is computed once into a buffer,
and the cosine attention becomes one scaled_dot_product_attention call:

    softmax(normalize(q)·normalize(k)ᵀ·τ + B + M)·v  =  SDPA(normalize(q)·τ, normalize(k), v, B + M, scale=1)

(τ = exp(min(logit_scale, log 100)) per head, B = 16·sigmoid(cpb_mlp(table))[index], M = shift mask).
The patched model is for eval only: call `fuse_window_attention` after the weights are loaded.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def _relative_bias(attn: nn.Module) -> torch.Tensor:
    heads, n = attn.num_heads, attn.window_size[0] * attn.window_size[1]
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
    bias = table[attn.relative_position_index.view(-1)].view(n, n, heads).permute(2, 0, 1).contiguous()
    return 16 * torch.sigmoid(bias)  # [heads, N, N]


def _fused_forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    b_, n, c = x.shape
    heads = self.num_heads
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
    q, k, v = qkv.reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B_, H, N, d]
    tau = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp().to(q.dtype)  # [H, 1, 1]
    q = F.normalize(q, dim=-1) * tau
    k = F.normalize(k, dim=-1)
    bias = self.fused_rel_bias.to(q.dtype)  # [H, N, N]
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=1.0)
    else:
        n_win = mask.shape[0]
        full = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).reshape(1, n_win * heads, n, n)
        shape = (b_ // n_win, n_win * heads, n, -1)  # windows of one image are consecutive in B_
        out = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                             attn_mask=full, scale=1.0).reshape(b_, heads, n, -1)
    x = out.transpose(1, 2).reshape(b_, n, c)
    return self.proj_drop(self.proj(x))


def fuse_window_attention(model: nn.Module) -> int:
    """Patch every SwinV2 WindowAttention in `model`; returns how many were patched."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ == "WindowAttention" and hasattr(module, "cpb_mlp"):
            bias = _relative_bias(module)
            if "fused_rel_bias" in module._buffers:
                module.fused_rel_bias = bias
            else:
                module.register_buffer("fused_rel_bias", bias, persistent=False)
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    return patched
