"""LoRA adapters served over one base model, many in one batch (adapter, tables, manager)."""
from kvloom.lora.adapter import LoraAdapter, LoraAdapterError, load_adapter
from kvloom.lora.manager import LoraManager

__all__ = ["LoraAdapter", "LoraAdapterError", "LoraManager", "load_adapter"]
