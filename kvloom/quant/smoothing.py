"""SmoothQuant-style smoothing before int8 activation quantization.

Activations of a few channels are far larger than the rest, so one per-token
int8 scale wastes most of its range on them. For a linear y = x W^T, dividing
input channel j by s_j and multiplying weight column j by s_j changes nothing
in exact arithmetic, but moves the outliers into the weights, which are
quantized per output channel and absorb them better. With
s_j = max|x_j|^a / max|W_j|^(1-a) (a = 0.5) both sides share the difficulty.
The division is folded into whatever produces x: the RMSNorm weight before
qkv, gate/up and the LM head, and the rows of `up` before down_proj, so
smoothing costs nothing at run time. Activation ranges come from one
calibration window of corpus text through the float model.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def activation_absmax(model: nn.Module, run_window) -> dict[nn.Linear, torch.Tensor]:
    """Per-input-channel max |x| of every linear the smoothing touches, over one forward pass."""
    stats: dict[nn.Linear, torch.Tensor] = {}

    def hook(mod, inputs, _out):
        x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)
        stats[mod] = torch.maximum(stats[mod], x) if mod in stats else x

    targets = [model.lm_head] + [m for layer in model.layers
                                 for m in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        run_window()
    finally:
        for h in handles:
            h.remove()
    return stats


def _factors(act: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    w = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    return (act.clamp(min=1e-5) ** alpha / w ** (1 - alpha)).clamp(min=1e-2, max=1e2)


@torch.no_grad()
def smooth(model: nn.Module, stats: dict[nn.Linear, torch.Tensor], alpha: float = 0.5) -> None:
    """Rescale weights in place; the model computes the same function afterwards."""
    for layer in model.layers:
        # Each linear's input is now x / s: kept (by fused linear name) for whatever else reads those inputs,
        # LoRA adapters (kvloom/lora/tables.py).
        layer.input_smoothing = {}
        for name, norm, lin in (("qkv", layer.input_layernorm, layer.self_attn.qkv_proj),
                                ("gate_up", layer.norm_before_mlp, layer.mlp.gate_up_proj)):
            s = _factors(stats[lin], lin.weight, alpha)
            norm.weight.div_(s.to(norm.weight.dtype))
            lin.weight.mul_(s.to(lin.weight.dtype))
            layer.input_smoothing[name] = s.float()
        down, gate_up = layer.mlp.down_proj, layer.mlp.gate_up_proj
        s = _factors(stats[down], down.weight, alpha)
        gate_up.weight[layer.mlp.intermediate_size:].div_(s[:, None].to(gate_up.weight.dtype))  # the `up` rows
        down.weight.mul_(s.to(down.weight.dtype))
        layer.input_smoothing["down"] = s.float()
    head = model.lm_head
    s = _factors(stats[head], head.weight, alpha)
    if head.weight is model.embed_tokens.weight:  # tied: the head gets its own (rescaled) copy
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.norm.weight.div_(s.to(model.norm.weight.dtype))
    head.weight.mul_(s.to(head.weight.dtype))
