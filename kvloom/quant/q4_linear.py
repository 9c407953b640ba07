"""4-bit weights as the GGUF ships them (Q4_0, Q4_1, Q4_K), multiplied by activations quantized per block
of 32 to int8 (w4a8, as llama.cpp multiplies its Q4 types on the CPU).

Every supported type is, per block of 32 inputs, w = d * q + off with q in 0..15: Q4_0 has off = -8 d,
Q4_1 stores off (its "m"), Q4_K has d = super-block d x 6-bit scale and off = -(dmin x 6-bit min) for each
of the eight blocks of a 256-value super-block. The load repacks them into one layout — the nibbles in
GGUF's Q4_0 order, a scale and an offset per block (float16 where exact, else float32) — without rounding anything: the weights are the
file's, bit for bit (tests compare with gguf's own dequantization). The kernel is
kvloom/kernels/q4_linear.cpp; without the native kernels the layer runs on its dequantized float weights.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kvloom.errors import WeightsError
from kvloom.kernels import kernels

BLOCK = 32
_BYTES = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q4_K": (144, 256)}   # bytes, values of a GGUF block
GGUF_TYPES = tuple(_BYTES)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _pack(values: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes: value i in the low nibble of byte i, value i + 16 in the high."""
    return (values[..., :16] | (values[..., 16:] << 4)).astype(np.uint8)


def repack_gguf(data: np.ndarray, type_name: str, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """A GGUF tensor's raw rows [out, bytes] -> (qs [out, in / 2] uint8, scales [out, 2, in / 32] float32)."""
    if type_name not in _BYTES:
        raise WeightsError(f"4-bit blocks from GGUF {type_name} are not supported (only {', '.join(GGUF_TYPES)})")
    nbytes, nvals = _BYTES[type_name]
    rows = data.shape[0]
    if in_features % nvals or data.shape[1] != in_features // nvals * nbytes:
        raise WeightsError(f"a {type_name} tensor of {in_features} inputs has {data.shape[1]} bytes a row")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, in_features // nvals, nbytes)
    nb = in_features // BLOCK
    if type_name == "Q4_0":
        d = _f16(blocks[..., 0:2])
        qs, off = blocks[..., 2:], -8.0 * d
    elif type_name == "Q4_1":
        d, off = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        qs = blocks[..., 4:]
    else:   # Q4_K: super-blocks of 256 = 8 blocks of 32
        dd, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc_raw = blocks[..., 4:16].reshape(rows, -1, 3, 4)
        a, m, md = sc_raw[..., 0, :], sc_raw[..., 1, :], sc_raw[..., 2, :]
        sc = np.concatenate([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], axis=-1).astype(np.float32)
        mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1).astype(np.float32)
        d = (dd[..., None] * sc).reshape(rows, nb)
        off = -(dmin[..., None] * mn).reshape(rows, nb)
        # Each 32 bytes hold two blocks: the low nibbles are the first, the high nibbles the second.
        q = blocks[..., 16:].reshape(rows, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        qs = _pack((q & 0x0F).reshape(rows, nb, 32))
    qs = np.ascontiguousarray(qs).reshape(rows, in_features // 2)
    scales = np.stack([d.reshape(rows, nb), off.reshape(rows, nb)], axis=1).astype(np.float32)
    return qs, scales


def group_rows(qs: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise blocks (qs [out, in / 2], scales [out, 2, in / 32]) -> the kernel's layout, rows in groups of
    8 (kvloom/kernels/q4_linear.cpp): ([groups, in / 32, 128] uint8, [groups, in / 32, 2, 8] float32). The
    last group is padded with zero rows."""
    out_f, nb = qs.shape[0], scales.shape[-1]
    groups = (out_f + 7) // 8
    pad = groups * 8 - out_f
    b = np.pad(qs.reshape(out_f, nb, 16), ((0, pad), (0, 0), (0, 0)))
    lo = (b & 0x0F).reshape(groups, 8, nb, 4, 4)       # values 4 L + t
    hi = (b >> 4).reshape(groups, 8, nb, 4, 4)         # values 16 + 4 L + t
    packed = (lo | (hi << 4)).transpose(0, 2, 3, 1, 4).reshape(groups, nb, 128)
    sc = np.pad(scales, ((0, pad), (0, 0), (0, 0))).reshape(groups, 8, 2, nb).transpose(0, 3, 2, 1)
    return np.ascontiguousarray(packed, dtype=np.uint8), np.ascontiguousarray(sc, dtype=np.float32)


def dequantize_grouped(qs: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """The kernel's layout -> float weights [out, in] (the PyTorch path, tests)."""
    groups, nb = qs.shape[0], qs.shape[1]
    b = qs.reshape(groups, nb, 4, 8, 4).to(torch.int32)           # [g, block, L, row, t]
    q = torch.cat([b & 0x0F, b >> 4], dim=2)                       # [g, block, 8 (value / 4), row, t]
    q = q.permute(0, 3, 1, 2, 4).reshape(groups * 8, nb, 32).float()
    if scales.shape[2] == 1:                                       # offsets not stored: -8 x scale (Q4_0)
        scales = torch.cat([scales, scales.float() * -8.0], dim=2)
    sc = scales.float().permute(0, 3, 2, 1).reshape(groups * 8, 2, nb)    # [row, (d, off), block]
    w = q * sc[:, 0, :, None] + sc[:, 1, :, None]
    return w.reshape(groups * 8, nb * BLOCK)[:out_features]


class Q4Linear(nn.Module):
    """A linear layer on 4-bit blocks, given row-wise (qs [out, in / 2], scales [out, 2, in / 32]); stored in the
    kernel's grouped layout. from_gguf_parts concatenates fused parts (q/k/v, gate/up) along the outputs."""

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, native: bool = True,
                 source_types: tuple[str, ...] = ()):
        super().__init__()
        self.out_features, self.in_features = qs.shape[0], qs.shape[1] * 2
        self.native = native
        self.source_types = source_types
        grouped_qs, grouped_scales = group_rows(qs.numpy(), scales.float().numpy())
        if np.array_equal(grouped_scales[:, :, 1], grouped_scales[:, :, 0] * np.float32(-8.0)):
            grouped_scales = grouped_scales[:, :, :1].copy()   # Q4_0: the kernel makes the offsets, -8 x scale
        # float16 where that holds every scale and offset exactly (Q4_0, Q4_1 come as float16): fewer bytes
        # to read a step, the same values; Q4_K's products of two scales stay float32.
        half = grouped_scales.astype(np.float16)
        if np.all(np.isfinite(half)) and np.array_equal(half.astype(np.float32), grouped_scales):
            grouped_scales = half
        self.register_buffer("qs", torch.from_numpy(grouped_qs))
        self.register_buffer("scales", torch.from_numpy(grouped_scales))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def from_gguf_parts(cls, parts: list[tuple[np.ndarray, str]], in_features: int, bias: torch.Tensor | None,
                        native: bool = True) -> "Q4Linear":
        packed = [repack_gguf(data, type_name, in_features) for data, type_name in parts]
        qs = torch.from_numpy(np.concatenate([p[0] for p in packed]))
        scales = torch.from_numpy(np.concatenate([p[1] for p in packed]))
        return cls(qs, scales, bias, native, tuple(sorted({t for _, t in parts})))

    @property
    def gemm_path(self) -> str:
        mod = kernels() if self.native else None
        if mod is None:
            return "float matmul on the dequantized weights (native kernels off)"
        return mod.q4_gemm_path()

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_grouped(self.qs, self.scales, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        native = kernels() if self.native else None
        if native is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            y = native.q4_linear(x.reshape(-1, shape[-1]).contiguous(), self.qs, self.scales, self.out_features,
                                 self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        if self._dequantized is None:      # the PyTorch path keeps a float copy (4x the memory): named in gemm_path
            self._dequantized = self.dequantized_weight()
        return nn.functional.linear(x, self._dequantized.to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))
