"""Fine-tuning jobs run inside the engine's loop, in the time inference leaves (FlexLLM's co-serving).

After every engine step the loop hands the co-trainer what is left of the step's time target
(`fine_tuning_step_ms`): a step whose inference took 30 ms of a 100 ms target leaves 70 ms of training; a step
that used it all leaves none, so inference always comes first. With no inference to run, training goes on in
slices of the same length, between which the loop takes new requests. The target is time, not tokens: training
here runs float autograd while inference runs integer kernels, so a token of one is not the cost of a token of
the other.

Training uses its own float copy of the base weights (loaded in the background when a job starts, released when
no job is left), so inference's weights, KV and outputs are never touched. A finished adapter is saved in
peft's format under `fine_tuning_dir` and served at once under the job's model name.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout

import torch

from kvloom.errors import InvalidRequestError, NotFoundError
from kvloom.finetune.jobs import TERMINAL, FineTuningJob
from kvloom.finetune.lora_forward import TrainableLora
from kvloom.finetune.peft_format import save_peft_adapter
from kvloom.finetune.sliced_trainer import SlicedTrainer, StepReport
from kvloom.models.loader import load_model

log = logging.getLogger(__name__)


class CoTrainer:
    def __init__(self, engine, output_dir: str | None, step_ms: float):
        self.engine = engine
        self.step_s = step_ms / 1000.0
        self.output_dir = output_dir or tempfile.mkdtemp(prefix="kvloom-fine-tuned-")
        self.jobs: dict[str, FineTuningJob] = {}       # every job of this process, by id (read by HTTP threads)
        self._queue: deque[str] = deque()              # jobs waiting for the trainer, oldest first
        self._running: tuple[FineTuningJob, SlicedTrainer, TrainableLora] | None = None
        self._base = None                              # the float copy of the base model, while jobs need it
        self._loading: Future | None = None
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvloom-ft-load")
        self.trained_tokens = 0                        # over all jobs, for metrics and benchmarks
        self.train_seconds = 0.0

    @property
    def active(self) -> bool:
        return self._running is not None or bool(self._queue)

    # ---- commands (engine thread) -----------------------------------------------------------

    def submit(self, job: FineTuningJob) -> None:
        self.jobs[job.id] = job
        self._queue.append(job.id)
        job.log(f"Fine-tuning job created: {len(job.examples)} examples, {job.hyperparameters.n_epochs} epochs")

    def get(self, job_id: str) -> FineTuningJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no fine-tuning job {job_id!r}", field="fine_tuning_job_id")
        return job

    def cancel(self, job_id: str) -> FineTuningJob:
        job = self.get(job_id)
        if job.status in TERMINAL:
            raise InvalidRequestError(f"job {job_id} has already {job.status}", field="fine_tuning_job_id")
        if self._running is not None and self._running[0] is job:
            self._running = None                       # its trainer, optimizer state and graphs go with it
        else:
            self._queue.remove(job_id)
        job.finish("cancelled")
        job.log("Job cancelled")
        self._release_base_if_idle()
        return job

    # ---- the loop's share -------------------------------------------------------------------

    def run_slice(self, inference_s: float) -> float:
        """Train for what the step left (inference_s: this step's inference time, 0 when idle). Returns the
        seconds spent."""
        budget = self.step_s - inference_s
        if budget <= 0 or not self.active:
            return 0.0
        if self._running is None and not self._start(wait=budget if inference_s == 0 else 0.0):
            return 0.0
        job, trainer, lora = self._running
        try:
            spent = trainer.run(budget, at_least_one=inference_s == 0)
        except Exception as e:   # a job's failure is the job's, never the engine's
            log.exception("fine-tuning job %s failed", job.id)
            self._end(job, "failed", {"code": "training_error", "message": f"{type(e).__name__}: {e}"})
            return 0.0
        self.train_seconds += spent
        job.train_seconds += spent
        self.trained_tokens += trainer.trained_tokens - job.trained_tokens
        job.trained_tokens = trainer.trained_tokens
        if trainer.done:
            self._publish(job, lora)
        return spent

    def _start(self, wait: float) -> bool:
        """Begin the oldest queued job once the float base model is loaded (waiting up to `wait` seconds)."""
        if self._base is None:
            if self._loading is None:
                self._loading = self._loader.submit(self._load_base)
            try:
                self._base = self._loading.result(timeout=wait)
            except FutureTimeout:
                return False
            except Exception as e:
                self._loading = None
                job = self.jobs[self._queue.popleft()]
                log.exception("cannot load the base model for fine-tuning")
                self._end(job, "failed", {"code": "base_model_error", "message": f"{type(e).__name__}: {e}"})
                return False
            self._loading = None
        job = self.jobs[self._queue.popleft()]
        hp = job.hyperparameters
        lora = TrainableLora(self._base, hp.lora_rank, hp.lora_alpha, hp.target_modules, job.seed)
        trainer = SlicedTrainer(self._base, lora, job.examples, hp.n_epochs, hp.batch_size, hp.learning_rate,
                                job.seed, on_step=lambda report: _log_step(job, report))
        job.status, job.total_steps = "running", trainer.total_steps
        job.log(f"Fine-tuning job started: {trainer.total_steps} steps")
        self._running = (job, trainer, lora)
        return True

    def _load_base(self):
        engine = self.engine
        model, _ = load_model(engine.source, torch.float32, engine.max_model_len)
        return model

    def _publish(self, job: FineTuningJob, lora: TrainableLora) -> None:
        name = job.adapter_name()
        path = os.path.join(self.output_dir, name.replace(":", "_").replace("/", "_"))
        try:
            save_peft_adapter(lora, path, self.engine.source.name)
            self.engine.load_lora(name, path)
        except Exception as e:
            log.exception("fine-tuning job %s: cannot serve its adapter", job.id)
            shutil.rmtree(path, ignore_errors=True)
            self._end(job, "failed", {"code": "publish_error", "message": f"{type(e).__name__}: {e}"})
            return
        job.output_dir, job.fine_tuned_model = path, name
        job.log(f"New fine-tuned model served: {name}")
        self._end(job, "succeeded")

    def _end(self, job: FineTuningJob, status: str, error: dict | None = None) -> None:
        if self._running is not None and self._running[0] is job:
            self._running = None
        job.finish(status, error)
        job.log(f"Job {status}" + (f": {error['message']}" if error else ""), "error" if error else "info")
        self._release_base_if_idle()

    def _release_base_if_idle(self) -> None:
        if not self.active:
            self._base = self._loading = None


def _log_step(job: FineTuningJob, report: StepReport) -> None:
    job.steps_done = report.step
    job.log(f"Step {report.step}/{report.total_steps}: training loss={report.loss:.4f}", kind="metrics",
            data={"step": report.step, "total_steps": report.total_steps, "train_loss": report.loss,
                  "epoch": report.epoch})
