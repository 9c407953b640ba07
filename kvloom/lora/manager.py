"""Which adapters are loaded, which of them hold the batch's slots, and for how many running requests.

Any number of adapters stay loaded (in memory); `max_loras` of them sit in the slot tables at once and take
turns (least recently used first out). A running request pins its adapter's slot; a request whose adapter
cannot get a slot (every slot pinned by other adapters) waits at the head of the queue, as vLLM's scheduler
makes it wait.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from kvloom.errors import InvalidRequestError
from kvloom.lora.adapter import LoraAdapter, load_adapter
from kvloom.lora.tables import LoraTables


class LoraManager:
    def __init__(self, model, max_loras: int, max_rank: int):
        self.max_rank = max_rank
        self.tables = LoraTables(model, max_loras, max_rank)
        self.num_layers = model.shape.num_layers
        self.adapters: dict[str, LoraAdapter] = {}
        self.keys: dict[str, bytes] = {}                  # name -> this load's id (prefix-cache salt)
        self._loads = itertools.count()
        self.slot_of: OrderedDict[str, int] = OrderedDict()   # adapters in slots, least recently used first
        self.pins = [0] * max_loras                       # running requests per slot

    # ---- the set of adapters -----------------------------------------------------------------

    def read(self, name: str, path: str) -> LoraAdapter:
        """Read and check an adapter directory (any thread: it touches nothing of the manager's)."""
        return load_adapter(name, path, self.tables.shapes, self.num_layers, self.max_rank)

    def load(self, name: str, path: str) -> LoraAdapter:
        return self.add(self.read(name, path))

    def add(self, adapter: LoraAdapter) -> LoraAdapter:
        name = adapter.name
        if name in self.adapters:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded; unload it first",
                                      field="lora_name")
        self.adapters[name] = adapter
        self.keys[name] = f"lora:{name}:{next(self._loads)}".encode()
        return adapter

    def unload(self, name: str, in_use: bool) -> None:
        """in_use: requests for it are still queued or running (the engine knows): then it stays."""
        if name not in self.adapters:
            raise InvalidRequestError(f"no LoRA adapter named {name!r} is loaded", field="lora_name")
        if in_use:
            raise InvalidRequestError(f"LoRA adapter {name!r} still has requests; retry when they finish",
                                      field="lora_name")
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.tables.write(slot, None)
        del self.adapters[name]
        del self.keys[name]

    # ---- slots ----------------------------------------------------------------------------

    def acquire(self, name: str) -> int | None:
        """A slot holding the adapter, pinned once more; None when every slot is pinned by other adapters."""
        slot = self.slot_of.get(name)
        if slot is None:
            used = set(self.slot_of.values())
            free = [s for s in range(len(self.pins)) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next((n for n, s in self.slot_of.items() if self.pins[s] == 0), None)
                if victim is None:
                    return None
                slot = self.slot_of.pop(victim)
            self.tables.write(slot, self.adapters[name])
            self.slot_of[name] = slot
        self.slot_of.move_to_end(name)
        self.pins[slot] += 1
        return slot

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1

    def release(self, slot: int) -> None:
        self.pins[slot] -= 1
