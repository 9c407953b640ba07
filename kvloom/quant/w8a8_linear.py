"""int8 weights and int8 activations: per-channel weight scales, dynamic per-token activation scales.

The product runs as an int8 x int8 -> int32 GEMM (torch._int_mm), which is
where the batched, compute-bound regime gains over fp32.
"""
from __future__ import annotations

import torch
from torch import nn

from kvloom.quant.int8_linear import quantize_per_channel_int8


class W8A8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scales = quantize_per_channel_int8(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_t", q.t().contiguous())       # [in, out]
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        sx = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        xq = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.weight_t).float() * sx * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
