"""A fine-tuning job as OpenAI's API shows it: hyperparameters, status, events, the model it produces.

Jobs live in the server process only: a restart forgets them (the adapters they saved stay on disk, loadable
with --lora-modules).
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from kvloom.errors import InvalidRequestError
from kvloom.finetune.dataset import TrainingExample
from kvloom.finetune.lora_forward import DEFAULT_TARGETS
from kvloom.lora.adapter import TARGETS

BASE_LEARNING_RATE = 1e-3     # what learning_rate_multiplier 1 means: a usual LoRA rate
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int = 3
    batch_size: int = 4
    learning_rate_multiplier: float = 1.0
    lora_rank: int = 8           # kvloom's extensions: the adapter's shape
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    @classmethod
    def parse(cls, given: dict | None, max_rank: int) -> Hyperparameters:
        """From a request's `hyperparameters` ("auto" or absent: the default), checked."""
        given = dict(given or {})
        unknown = set(given) - {"n_epochs", "batch_size", "learning_rate_multiplier", "lora_rank", "lora_alpha",
                                "target_modules"}
        if unknown:
            raise InvalidRequestError(f"unknown hyperparameters {sorted(unknown)}", field="hyperparameters")
        values = {k: v for k, v in given.items() if v != "auto" and v is not None}

        def number(name, kind, low, high):
            v = values.get(name)
            if v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) \
                    or not low <= v <= high:
                raise InvalidRequestError(f"hyperparameters.{name} must be {'an integer' if kind is int else 'a number'}"
                                          f" in [{low}, {high}], got {v!r}", field=f"hyperparameters.{name}")
            values[name] = kind(v)

        number("n_epochs", int, 1, 50)
        number("batch_size", int, 1, 256)
        number("learning_rate_multiplier", float, 1e-4, 100.0)
        number("lora_rank", int, 1, max_rank)
        number("lora_alpha", float, 1e-3, 1e4)
        targets = values.get("target_modules")
        if targets is not None:
            if (not isinstance(targets, list) or not targets
                    or not all(isinstance(t, str) and t in TARGETS for t in targets)):
                raise InvalidRequestError(f"hyperparameters.target_modules must be a non-empty list of {list(TARGETS)}",
                                          field="hyperparameters.target_modules")
            values["target_modules"] = tuple(dict.fromkeys(targets))
        if "lora_rank" in values and "lora_alpha" not in values:
            values["lora_alpha"] = 2.0 * values["lora_rank"]
        return cls(**values)

    def to_api(self) -> dict:
        return {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
                "learning_rate_multiplier": self.learning_rate_multiplier, "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha, "target_modules": list(self.target_modules)}


@dataclass
class JobEvent:
    id: str
    created_at: int
    level: str
    message: str
    data: dict | None = None
    type: str = "message"

    def to_api(self) -> dict:
        return {"id": self.id, "object": "fine_tuning.job.event", "created_at": self.created_at,
                "level": self.level, "message": self.message, "data": self.data or {}, "type": self.type}


@dataclass
class FineTuningJob:
    id: str
    model: str
    training_file: str
    hyperparameters: Hyperparameters
    seed: int
    suffix: str | None
    examples: list[TrainingExample]
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int = 0       # so far (OpenAI shows it once the job succeeds; `kvloom.progress` meanwhile)
    steps_done: int = 0
    total_steps: int | None = None
    train_seconds: float = 0.0
    error: dict | None = None
    output_dir: str | None = None
    events: list[JobEvent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @staticmethod
    def new_id() -> str:
        return f"ftjob-{secrets.token_hex(12)}"

    def adapter_name(self) -> str:
        """The model name the finished adapter is served by (OpenAI's ft:BASE:SUFFIX:ID shape)."""
        tail = self.id.removeprefix("ftjob-")[:8]
        return f"ft:{self.model}:{self.suffix}:{tail}" if self.suffix else f"ft:{self.model}:{tail}"

    def log(self, message: str, level: str = "info", data: dict | None = None, kind: str = "message") -> None:
        with self._lock:
            self.events.append(JobEvent(f"ftevent-{secrets.token_hex(12)}", int(time.time()), level, message,
                                        data, kind))

    def finish(self, status: str, error: dict | None = None) -> None:
        self.status, self.error, self.finished_at = status, error, int(time.time())

    def to_api(self) -> dict:
        return {"id": self.id, "object": "fine_tuning.job", "created_at": self.created_at,
                "finished_at": self.finished_at, "model": self.model, "fine_tuned_model": self.fine_tuned_model,
                "organization_id": "kvloom", "status": self.status, "training_file": self.training_file,
                "validation_file": None, "result_files": [], "hyperparameters": self.hyperparameters.to_api(),
                "trained_tokens": self.trained_tokens if self.status == "succeeded" else None,
                "error": self.error, "seed": self.seed, "estimated_finish": None, "integrations": [],
                "suffix": self.suffix,
                "kvloom": {"progress": {"trained_tokens": self.trained_tokens, "steps": self.steps_done,
                                        "total_steps": self.total_steps, "train_seconds": self.train_seconds}},
                "method": {"type": "supervised",
                           "supervised": {"hyperparameters": {k: v for k, v in self.hyperparameters.to_api().items()
                                                              if k in ("n_epochs", "batch_size",
                                                                       "learning_rate_multiplier")}}}}

    def events_api(self, limit: int) -> list[dict]:
        """Newest first, as OpenAI lists them."""
        with self._lock:
            return [e.to_api() for e in reversed(self.events[-limit:])]
