"""int8 weights and int8 activations: per-channel weight scales, dynamic per-token activation scales.

The product runs as an int8 x int8 -> int32 GEMM, which is where the batched,
compute-bound regime gains over fp32. With the native kernels, quantizing the
activations and scaling the result happen in the same call (one op instead of
ten small ones: the batch-1 step is overhead-bound), and the kernels pick the
product's loop for the build and the CPU (kvloom/kernels/w8a8_linear.cpp): the
VNNI GEMV up to 16 rows and oneDNN's torch._int_mm above on AVX-512 VNNI; the
AVX2 sign-trick loop at every row count on AVX2 machines, where oneDNN's int8
GEMM has no fast path (~4 GOP/s). Integer sums are exact and the float
epilogue is shared, so the choice never changes a row's bits (batch invariance).
`gemm_path` names the loop in use. Without native kernels: torch._int_mm.
"""
from __future__ import annotations

import torch
from torch import nn

from kvloom.kernels import kernels
from kvloom.quant.int8_linear import quantize_per_channel_int8


def w8a8_gemm_path(native: bool = True) -> str:
    """What computes the w8a8 product here: the native kernels' choice for this build and CPU, or the PyTorch path."""
    mod = kernels() if native else None
    if mod is None:
        return "torch._int_mm (PyTorch path)"
    return mod.int8_gemm_path() if hasattr(mod, "int8_gemm_path") else "native kernels"


class W8A8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native: bool = True):
        super().__init__()
        self.native = native
        q, scales = quantize_per_channel_int8(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # Stored [out, in] and passed to the GEMM transposed: oneDNN's int8 GEMM runs ~2x faster at one row
        # with this layout than with a contiguous [in, out] (measured; equal at 32 rows).
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        # The weights again in groups of 16 rows, for the grouped loop (pack_row_groups).
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("row_sums", None, persistent=False)

    def pack_row_groups(self) -> bool:
        """Keep a second copy of the weights in the grouped loop's layout (kernels/int8_grouped_gemv.cpp) and
        use it at 1-4 rows (VNNI builds) or at every row count (AVX2 builds, unless oneDNN's VNNI GEMM takes the
        larger batches): the same bits, computed faster. Meant for the LM head, a large share of a decode step;
        it costs the weights' size again. False where the kernels cannot."""
        native = kernels() if self.native else None
        if native is None or not native.int8_grouped_gemv_available():
            return False
        self.packed, self.row_sums = native.int8_pack_row_groups(self.weight)
        return True

    @property
    def gemm_path(self) -> str:
        """Which loop runs this layer's int8 product (a string for /server_info and the logs)."""
        if self.packed is None:
            return w8a8_gemm_path(self.native)
        return kernels().int8_grouped_path()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        native = kernels() if self.native else None
        if native is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            y = native.w8a8_linear(x.reshape(-1, shape[-1]).contiguous(), self.weight.t(), self.scales, self.bias,
                                   packed=self.packed, row_sums=self.row_sums)
            return y.reshape(*shape[:-1], self.out_features)
        x2 = x.reshape(-1, shape[-1]).float()
        sx = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        xq = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.weight.t()).float() * sx * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
