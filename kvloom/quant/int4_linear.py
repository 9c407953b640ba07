"""Weight-only int4: group-wise asymmetric (w = (q - 8) * scale + zero); float activations.

GGUF's Q4_0 (w = (q - 8) * d) and Q4_1 (w = q * d + m) are this format with
group 32, so those weights load into it without loss.

With the native kernels the product is kvloom/kernels/weight_only_linear.cpp, which widens each weight as
fma(q, scale, offset) with offset = zero - 8 * scale; without them, PyTorch's int4 CPU kernel (vectorized
for AVX-512 only).
"""
from __future__ import annotations

import torch
from torch import nn

from kvloom.kernels import kernels
from kvloom.quant.weight_panels import int4_panels, padded_columns, panels


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
                 bias: torch.Tensor | None, native: bool = True):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group = group
        self.native = native and kernels() is not None
        if self.native:
            self.register_buffer("weight_int4", int4_panels(q))
            self.register_buffer("scales", panels(scale.float()))
            self.register_buffer("offsets", panels((zero - 8.0 * scale).float()))
            self.register_buffer("bias", None if bias is None else padded_columns(bias.detach()))
        else:
            self.register_buffer("weight_int4",
                                 torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            # [groups, out, 2]: the layout the kernel reads
            self.register_buffer("scales_and_zeros",
                                 torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().float())
            self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group: int,
                   native: bool = True) -> "Int4Linear":
        q, scale, zero = quantize_groupwise_int4(weight, group)
        return cls(q, scale, zero, group, bias, native)

    @property
    def gemm_path(self) -> str:
        return kernels().weight_only_path() if self.native else "torch _weight_int4pack_mm_for_cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.native:
            y = kernels().int4_weight_linear(x2.contiguous(), self.weight_int4, self.scales, self.offsets,
                                             self.group, self.out_features, self.bias)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group,
                                                       self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
