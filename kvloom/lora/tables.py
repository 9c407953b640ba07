"""The adapter slots of the model's fused linears, and the delta every step adds through them.

Each of qkv, o, gate_up and down gets a = [slots, parts * max_rank, in] and b_t = [slots, parts * max_rank, out]
(B transposed, so the kernel adds rows of it): a fused linear's parts (q, k, v; gate, up) sit side by side in a
and block-diagonally in b_t, so one pass gives every part its own adapter. A row of the batch names a slot (-1: none) and gets
y += b[slot] (a[slot] x): kernels/lora_delta.cpp, row by row in a fixed order, so a row's bits do not
depend on its batch. The module path (llama.py) and the decode stack read the same tables.
"""
from __future__ import annotations

import torch

from kvloom.kernels import kernels
from kvloom.lora.adapter import TARGETS, LoraAdapter

FUSED = ("qkv", "o", "gate_up", "down")


def part_shapes(model) -> dict[str, list[tuple[int, int]]]:
    """(out, in) of each part of the fused linears, as peft names them in order."""
    s = model.shape
    q, kv, hidden, inter = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.hidden_size, s.intermediate_size
    return {"qkv": [(q, hidden), (kv, hidden), (kv, hidden)], "o": [(hidden, q)],
            "gate_up": [(inter, hidden), (inter, hidden)], "down": [(hidden, inter)]}


class LoraTables:
    def __init__(self, model, num_slots: int, max_rank: int):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.shapes = part_shapes(model)
        self.layers: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []   # (a, b_t, spans)
        for layer in model.layers:
            tables = {}
            for name in FUSED:
                parts = self.shapes[name]
                out, width = sum(p[0] for p in parts), parts[0][1]
                starts = [sum(p[0] for p in parts[:k]) for k in range(len(parts))]
                spans = torch.tensor([[starts[k], starts[k] + parts[k][0]] for k in range(len(parts))
                                      for _ in range(max_rank)], dtype=torch.long)
                tables[name] = (torch.zeros(num_slots, len(parts) * max_rank, width),
                                torch.zeros(num_slots, len(parts) * max_rank, out), spans)
            layer.self_attn.lora = {"qkv": tables["qkv"], "o": tables["o"]}
            layer.mlp.lora = {"gate_up": tables["gate_up"], "down": tables["down"]}
            self.layers.append(tables)
        # w8a8's smoothing (quant/smoothing.py) divides some linears' inputs by s (and `up`'s outputs, which are
        # down's inputs): the adapters must see the inputs the base model saw, so a is scaled by s, and b of
        # `up` divided by down's s.
        self.smoothing = [getattr(layer, "input_smoothing", {}) for layer in model.layers]

    def for_stack(self) -> list[list[torch.Tensor]]:
        """The decode stack's view: per layer, (a, b_t, spans) of qkv, o, gate_up, down."""
        return [[t for name in FUSED for t in layer[name]] for layer in self.layers]

    @torch.no_grad()
    def write(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Put an adapter's weights (scaling folded into b) in a slot; None empties it."""
        for layer in self.layers:
            for a, b, _ in layer.values():
                a[slot].zero_()
                b[slot].zero_()
        if adapter is None:
            return
        r = self.max_rank
        for (i, module), (a_w, b_w) in adapter.weights.items():
            fused, part = TARGETS[module]
            a, b, _ = self.layers[i][fused]
            rows = sum(p[0] for p in self.shapes[fused][:part])
            out = self.shapes[fused][part][0]
            a_eff, b_eff = a_w, b_w * adapter.scaling
            s_in = self.smoothing[i].get(fused)
            if s_in is not None:
                a_eff = a_eff * s_in[None, :]
            s_down = self.smoothing[i].get("down")
            if fused == "gate_up" and part == 1 and s_down is not None:
                b_eff = b_eff / s_down[:, None]
            a[slot, part * r:part * r + adapter.rank] = a_eff
            b[slot, part * r:part * r + adapter.rank, rows:rows + out] = b_eff.T


def lora_add(x: torch.Tensor, y: torch.Tensor, table: tuple, slots: torch.Tensor) -> None:
    """y += B[slot] (a[slot] x) for each row with a slot >= 0 (B = b_t[slot]^T). x [M, in], y [M, out], in place.
    table: (a, b_t, spans), spans saying which outputs each rank row of b_t can touch."""
    a, b_t, spans = table
    native = kernels()
    if native is not None and x.dtype == torch.float32 and y.dtype == torch.float32:
        native.lora_add(x.contiguous(), y, a, b_t, slots, spans)
        return
    for s in slots.unique().tolist():       # the plain-PyTorch path: one gathered matmul per adapter
        if s < 0:
            continue
        rows = (slots == s).nonzero().flatten()
        y.index_add_(0, rows, ((x[rows].float() @ a[s].T) @ b_t[s]).to(y.dtype))
