"""Weight-only int8: per-output-channel symmetric scales; float activations.

With the native kernels the product is kvloom/kernels/weight_only_linear.cpp (weights widened to float in
L1, one FMA chain an output: batch-invariant, and the same on AVX2 and AVX-512 hosts); without them,
PyTorch's int8-weight CPU kernel (whose only vector path is AVX-512: on AVX2-only hosts it ran at 0.02-0.4x
float32's speed).
"""
from __future__ import annotations

import torch
from torch import nn

from kvloom.kernels import kernels
from kvloom.quant.weight_panels import padded_columns, panels


def quantize_per_channel_int8(w: torch.Tensor, rows_at_once: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (int8 [out, in], scales [out]) with w ~= q * scale. Rows are independent, so they
    go a slice at a time: the float temporaries stay small beside a large LM head (1 GB at Llama-3.2-1B's)."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0], dtype=torch.float32)
    for start in range(0, w.shape[0], rows_at_once):
        part = w[start:start + rows_at_once].float()
        s = (part.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q[start:start + rows_at_once] = torch.round(part / s[:, None]).clamp(-127, 127).to(torch.int8)
        scales[start:start + rows_at_once] = s
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native: bool = True):
        super().__init__()
        q, scales = quantize_per_channel_int8(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.native = native and kernels() is not None
        if self.native:   # the kernel's panels; the scales multiply each column's sum; scales, bias padded
            self.register_buffer("weight_int8", panels(q))
            self.register_buffer("scales", padded_columns(scales))
            self.register_buffer("bias", None if bias is None else padded_columns(bias.detach()))
        else:
            self.register_buffer("weight_int8", q)
            self.register_buffer("scales", scales)
            self.register_buffer("bias", None if bias is None else bias.detach().float())

    @property
    def gemm_path(self) -> str:
        return kernels().weight_only_path() if self.native else "torch _weight_int8pack_mm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.native:
            y = kernels().int8_weight_linear(x2.float().contiguous(), self.weight_int8, self.scales,
                                             self.out_features, self.bias).to(x.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
