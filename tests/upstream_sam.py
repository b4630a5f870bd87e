"""Copies of vLLM 0.26 deepencoder.py's SAM modules (same parameters, same forward) for the CPU
tests of runner/vllm_plugin/sam_attention.py and sam_fused.py."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from runner.vllm_plugin import sam_attention as sa


class RelPosAttention(nn.Module):
    """Copy of upstream's module (parameters and forward)."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = True
        self.rel_pos_h = nn.Parameter(torch.randn(2 * input_size[0] - 1, head_dim) * 0.5)
        self.rel_pos_w = nn.Parameter(torch.randn(2 * input_size[1] - 1, head_dim) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        Rh = sa.get_rel_pos(H, H, self.rel_pos_h)
        Rw = sa.get_rel_pos(W, W, self.rel_pos_w)
        r_q = q.reshape(B * self.num_heads, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).unsqueeze(-1).reshape(-1, H * W, H, 1)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).unsqueeze(-2).reshape(-1, H * W, 1, W)
        q = q.view(B, self.num_heads, H * W, -1)
        k = k.view(B, self.num_heads, H * W, -1)
        v = v.view(B, self.num_heads, H * W, -1)
        rel_h = rel_h.view(B, self.num_heads, rel_h.size(1), rel_h.size(2), rel_h.size(3))
        rel_w = rel_w.view(B, self.num_heads, rel_w.size(1), rel_w.size(2), rel_w.size(3))
        bias = (rel_h + rel_w).view(B, self.num_heads, rel_h.size(2), rel_h.size(3) * rel_w.size(4))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)
