"""Weight-only int4: group-wise asymmetric (w = (q - 8) * scale + zero), PyTorch's int4 CPU matmul kernel.

GGUF's Q4_0 (w = (q - 8) * d) and Q4_1 (w = q * d + m) are this format with
group 32, so those weights load into it without loss.
"""
from __future__ import annotations

import torch
from torch import nn


def quantize_groupwise_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q in 0..15 [out, in] int32, scale [out, groups], zero [out, groups])."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    return q, scale, lo + 8.0 * scale


class Int4Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group = group
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # [groups, out, 2]: the layout the kernel reads
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> "Int4Linear":
        q, scale, zero = quantize_groupwise_int4(weight, group)
        return cls(q, scale, zero, group, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.float(), self.weight_int4, self.group,
                                                       self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
