"""Weight-only int8: per-output-channel symmetric scales, PyTorch's int8-weight CPU matmul kernel."""
from __future__ import annotations

import torch
from torch import nn


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
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scales = quantize_per_channel_int8(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, self.scales.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
