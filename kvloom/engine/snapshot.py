"""A request made portable: everything needed to continue it in another engine.

`Engine.export_request` takes a request (with all n samples of its family: they move
together) out of an engine as a `RequestSnapshot`; `Engine.import_request` continues it
in another, with the same tokens it would have produced where it was. With KV, the
family's computed blocks travel as tensors (deduplicated: forked samples share their
prompt's blocks, and still do after the move); without KV, the destination recomputes
them from the tokens (the fault-recovery path).

A snapshot is plain data: dataclasses of Python values and CPU tensors, so pickle and
Ray's object store carry it as is. `to_bytes` / `from_bytes` give a pickle-free form
(safetensors for the tensors, JSON for the rest) for crossing a trust boundary.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvloom.engine.sampler import TokenLogprobs
from kvloom.sampling_params import SamplingParams

FORMAT_VERSION = 1


@dataclass
class SampleSnapshot:
    """One sample of a family: its tokens, progress, RNG and output state."""

    request_id: str
    index: int
    params: SamplingParams
    max_tokens: int
    output_token_ids: list[int]
    num_computed_tokens: int               # tokens whose KV the snapshot's blocks hold (0 without KV)
    generator_state: torch.Tensor | None   # torch.Generator.get_state(): the exact place in its random stream
    output_state: dict                      # OutputState.export(): detokenizer offsets, text, hold-back, logprobs
    block_table: list[int]                  # indices into RequestSnapshot.kv's blocks
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    forked: bool = True                     # False: a sample still waiting to fork from sample 0's prompt
    speculation: dict | None = None         # the speculator's estimate of this request's acceptance


@dataclass
class KVBlocks:
    """Computed KV blocks of a family, as the source cache's own tensors (all layers stacked first)."""

    layout: dict                            # what must match at the destination (kind, block size, shapes)
    tensors: dict[str, torch.Tensor]
    num_blocks: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class RequestSnapshot:
    request_id: str                         # the family's id (the one add_request returned)
    prompt_token_ids: list[int]
    arrival_time: float
    samples: list[SampleSnapshot]
    session_id: str | None = None
    priority: int = 0
    cache_salt: str | None = None           # the tenant's salt (the engine's own is added where it runs)
    kv: KVBlocks | None = None
    version: int = FORMAT_VERSION
    lora_name: str | None = None            # its LoRA adapter: the destination must have one of that name

    def without_kv(self) -> "RequestSnapshot":
        """The same request, to be recomputed from its tokens where it lands."""
        samples = [dataclasses.replace(s, num_computed_tokens=0, block_table=[]) for s in self.samples]
        return dataclasses.replace(self, samples=samples, kv=None)

    # ---- a pickle-free wire form -------------------------------------------------------

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        samples = []
        for i, s in enumerate(self.samples):
            d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                 if f.name not in ("params", "generator_state", "output_state")}
            d["params"] = _params_dict(s.params)
            d["output_state"] = _output_state_json(s.output_state)
            if s.generator_state is not None:
                tensors[f"generator.{i}"] = s.generator_state
            samples.append(d)
        meta = {"request_id": self.request_id, "prompt_token_ids": self.prompt_token_ids,
                "arrival_time": self.arrival_time, "session_id": self.session_id, "priority": self.priority,
                "cache_salt": self.cache_salt, "version": self.version, "samples": samples,
                "kv": None if self.kv is None else {"layout": self.kv.layout, "num_blocks": self.kv.num_blocks}}
        if self.kv is not None:
            tensors.update({f"kv.{k}": v.contiguous() for k, v in self.kv.tensors.items()})
        return st_save(tensors, metadata={"kvloom_snapshot": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "RequestSnapshot":
        tensors = st_load(data)
        meta = json.loads(_metadata(data)["kvloom_snapshot"])
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"request snapshot format {meta.get('version')} is not {FORMAT_VERSION}")
        samples = []
        for i, d in enumerate(meta.pop("samples")):
            d["params"] = SamplingParams(**d["params"])
            d["output_state"] = _output_state_from_json(d["output_state"])
            d["generator_state"] = tensors.get(f"generator.{i}")
            samples.append(SampleSnapshot(**d))
        kv = meta.pop("kv")
        if kv is not None:
            kv = KVBlocks(kv["layout"], {k[3:]: v for k, v in tensors.items() if k.startswith("kv.")},
                          kv["num_blocks"])
        return cls(samples=samples, kv=kv, **meta)


def _params_dict(p: SamplingParams) -> dict:
    d = {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}
    if p.structured_outputs is not None:   # plain JSON; SamplingParams turns the dict back into its class
        d["structured_outputs"] = p.structured_outputs.to_dict()
    return d


def _output_state_json(state: dict) -> dict:
    d = dict(state)
    if d.get("logprobs") is not None:
        d["logprobs"] = [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in d["logprobs"]]
    return d


def _output_state_from_json(d: dict) -> dict:
    if d.get("logprobs") is not None:
        d["logprobs"] = [TokenLogprobs(t, lp, [tuple(x) for x in top]) for t, lp, top in d["logprobs"]]
    return d


def _metadata(data: bytes) -> dict:
    """The safetensors header's __metadata__ (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})
