"""Quantized linear layers (weight-only int8 / int4, and int8 weights with int8 activations)."""
from kvloom.quant.quantize_model import SCHEMES, quantize_model

__all__ = ["SCHEMES", "quantize_model"]
