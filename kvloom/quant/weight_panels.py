"""The weight-only kernels' layout (kvloom/kernels/weight_only_linear.cpp): columns in panels of 16, k-major.

int8 [out, in] -> [P, in, 16]; 4-bit values 0..15 -> [P, in, 8] bytes (byte j: column j in the low nibble,
column j + 8 in the high one), and per-group rows [out, groups] -> [P, groups, 16]. Columns past `out` are
zero, so the padded outputs are zero and the kernel drops them.
"""
from __future__ import annotations

import torch

PANEL = 16


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    pad = -t.shape[0] % PANEL
    return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t


def panels(t: torch.Tensor) -> torch.Tensor:
    """[out, n] -> [P, n, 16]: panel p, entry i, lane j is t[16 p + j, i]."""
    t = _padded_rows(t)
    return t.reshape(-1, PANEL, t.shape[1]).transpose(1, 2).contiguous()


def int4_panels(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [out, in] -> [P, in, 8] uint8, two columns a byte."""
    p = panels(q.to(torch.uint8))
    return (p[..., :PANEL // 2] | (p[..., PANEL // 2:] << 4)).contiguous()


def padded_columns(v: torch.Tensor) -> torch.Tensor:
    """A per-column vector [out] (scales, bias) as float, padded with zeros to whole panels."""
    return _padded_rows(v.float().reshape(-1, 1)).reshape(-1).contiguous()
