"""An embedding table kept in the GGUF's own blocks (Q8_0 in SmolLM2's and Llama-3.2's files).

A lookup reads one row a token, so the table need not be float: a lookup
dequantises only the rows it reads, with gguf's own dequantisation, which is
what the float table held (the load dequantises the same bytes the same way).
The values are the same bits at about a quarter of the memory: Llama-3.2-1B's
128k x 2048 table is 279 MB here against 1.05 GB in float32.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from kvloom.kernels import kernels


class BlockEmbedding(nn.Module):
    def __init__(self, rows: np.ndarray, type_name: str, dtype: torch.dtype, native: bool = True):
        super().__init__()
        self.type = GGMLQuantizationType[type_name]
        values, self.block_bytes = GGML_QUANT_SIZES[self.type]
        self.num_embeddings = rows.shape[0]
        self.embedding_dim = rows.shape[1] // self.block_bytes * values
        self.dtype = dtype
        # Q8_0 rows to float32 in one native call, the same products (every decode step looks up: ~15 torch ops
        # took 0.11-0.17 ms of a batch-1 step); off with the engine's native kernels.
        self.native = (native and self.type == GGMLQuantizationType.Q8_0 and dtype == torch.float32
                       and kernels() is not None)
        self.register_buffer("rows", torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8)), persistent=False)

    @property
    def row_bytes(self) -> int:
        return self.rows.shape[1]

    def _dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        if self.type == GGMLQuantizationType.Q8_0:   # every decode step looks up: a few torch ops, not gguf's numpy
            blocks = rows.reshape(rows.shape[0], -1, self.block_bytes)   # a float16 scale, 32 int8
            scale = blocks[..., :2].contiguous().view(torch.float16).float()
            values = (blocks[..., 2:].contiguous().view(torch.int8).float() * scale).reshape(rows.shape[0], -1)
        else:
            values = torch.from_numpy(np.ascontiguousarray(dequantize(rows.numpy(), self.type), dtype=np.float32))
        return values.to(self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        if self.native:
            return kernels().q8_0_rows(self.rows, ids.contiguous()).reshape(*input_ids.shape, self.embedding_dim)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        return self._dequantized(self.rows[ids]).reshape(*input_ids.shape, self.embedding_dim)

    def float_rows(self) -> "FloatRows":
        """The table as a float [rows, dim] that dequantises only the slice taken: a tied LM head is
        quantized from it without the whole float table in memory."""
        return FloatRows(self)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, blocks={self.type.name}"


class FloatRows:
    def __init__(self, table: BlockEmbedding):
        self.table = table
        self.shape = (table.num_embeddings, table.embedding_dim)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.table._dequantized(self.table.rows[rows])
