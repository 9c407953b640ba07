"""Engine settings: one frozen dataclass, checked once at start-up.

Every knob has one name across the CLI flag, this field and the docs
(`--max-num-batched-tokens` / `max_num_batched_tokens`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kvloom.errors import KvloomError

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
               "g": 10**9, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise KvloomError(f"cannot read {text!r} as a size; use e.g. 512MiB, 2GiB or a byte count")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


# auto: with the native kernels and float32, a GGUF whose projections are 4-bit runs them on its own blocks
# (gguf), one with 8-bit (or 5-6 bit) projections in w8a8; anything else runs as stored (none, the reference
# mode: fp32 as transformers).
# int8 / int4: weight-only; w8a8: int8 weights and activations; gguf: the file's Q4_0/Q4_1/Q4_K blocks x int8
# activations (as llama.cpp), layers of other types in w8a8.
QUANTIZATIONS = ("auto", "none", "int8", "int4", "w8a8", "gguf")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is built from. `model=None` is the built-in default model."""

    model: str | None = None
    tokenizer: str | None = None          # defaults to the model's own
    dtype: str = "float32"
    quantization: str = "auto"            # auto | none | int8 | int4 | w8a8 | gguf (see QUANTIZATIONS)
    quantization_group_size: int = 32     # int4 group size (32, 64 or 128)
    # auto: float16 when the weights run quantized and the vector attention kernels read the pool, else the
    # model's dtype (Engine resolves it) | float32 | bfloat16 | float16 | int8 (keys per channel, values per token)
    kv_cache_dtype: str = "auto"
    window_kv_release: bool = True        # sliding-window layers give back KV behind their window (kv/window_pages.py)
    max_model_len: int | None = None      # defaults to the model's context, capped by the KV pool
    block_size: int = 16                  # tokens per KV block
    kv_cache_memory: int = 1 << 30        # bytes for the KV pool
    max_num_seqs: int = 64                # running requests at most
    max_num_batched_tokens: int = 512     # the SplitFuse token budget of one forward pass
    # Steps that carry decodes stay under this many ms (prompt chunks sized to fit, admissions wait while the
    # decodes fill it: engine/tpot_target.py); None: the token budget alone. `kvloom serve` defaults to 100.
    tpot_target_ms: float | None = None
    enable_prefix_caching: bool = True    # reuse KV blocks of identical leading tokens across requests
    session_kv_fraction: float = 0.5      # at most this share of the pool kept for idle agent sessions
    session_ttl: float = 300.0            # seconds an idle session's KV is kept
    speculative: str = "none"             # none | lookahead (draft tokens from n-gram tries, verified in one pass)
    spec_max_tokens: int = 8              # draft tokens per request per step at most
    spec_branches: int = 2                # children per draft-tree node at most
    native_kernels: bool = True           # the C++ kernels (compiled at install; False: plain PyTorch paths)
    seed: int = 0                         # seeds requests that bring no seed of their own
    num_threads: int | None = None        # torch intra-op threads (None: torch's default)
    # LoRA adapters (kvloom/lora): served when enable_lora or lora_modules is given; (name, peft directory) pairs
    # loaded at start, more at run time; max_loras of them in one batch, each of rank max_lora_rank at most.
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_loras: int = 4
    max_lora_rank: int = 16
    # Fine-tuning while serving (kvloom/finetune): LoRA jobs trained in the time inference leaves of each step,
    # a step stretched to fine_tuning_step_ms at most; finished adapters are saved under fine_tuning_dir.
    enable_fine_tuning: bool = False
    fine_tuning_dir: str | None = None
    fine_tuning_step_ms: float = 100.0

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise KvloomError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise KvloomError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quantization == "gguf" and self.dtype != "float32":
            raise KvloomError(f"quantization gguf computes in float32 (its kernel's activations); got dtype {self.dtype}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise KvloomError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.speculative not in ("none", "lookahead"):
            raise KvloomError(f"speculative must be none or lookahead, got {self.speculative!r}")
        if self.spec_max_tokens < 1 or self.spec_branches < 1:
            raise KvloomError("spec_max_tokens and spec_branches must be >= 1")
        if self.quantization_group_size not in (32, 64, 128):
            raise KvloomError(f"quantization_group_size must be 32, 64 or 128, got {self.quantization_group_size}")
        for name in ("block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens"):
            if int(getattr(self, name)) < 1:
                raise KvloomError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size & (self.block_size - 1):   # the kernels address rows by shift and mask
            raise KvloomError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 <= self.session_kv_fraction <= 1.0:
            raise KvloomError(f"session_kv_fraction must be in [0, 1], got {self.session_kv_fraction}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise KvloomError("max_loras and max_lora_rank must be >= 1")
        if not self.fine_tuning_step_ms > 0:
            raise KvloomError(f"fine_tuning_step_ms must be > 0, got {self.fine_tuning_step_ms}")
        if self.tpot_target_ms is not None and not self.tpot_target_ms > 0:
            raise KvloomError(f"tpot_target_ms must be > 0 (None: no target), got {self.tpot_target_ms}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise KvloomError(f"max_model_len must be >= 2, got {self.max_model_len}")
