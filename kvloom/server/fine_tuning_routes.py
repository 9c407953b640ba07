"""OpenAI's files and fine-tuning routes, trained inside this server (kvloom/finetune):

    POST   /v1/files                              multipart: file (JSONL), purpose "fine-tune"
    GET    /v1/files, /v1/files/{id}, /v1/files/{id}/content;  DELETE /v1/files/{id}
    POST   /v1/fine_tuning/jobs                   {model, training_file, hyperparameters, suffix, seed}
    GET    /v1/fine_tuning/jobs, /v1/fine_tuning/jobs/{id}, /v1/fine_tuning/jobs/{id}/events
    POST   /v1/fine_tuning/jobs/{id}/cancel

The training file is read and tokenized when the job is created, so a file kvloom cannot train on is a 400
naming the line, not a job that fails later.
"""
from __future__ import annotations

import asyncio
import secrets
from typing import Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from kvloom.errors import InvalidRequestError
from kvloom.finetune.dataset import parse_training_file
from kvloom.finetune.files import FileStore
from kvloom.finetune.jobs import FineTuningJob, Hyperparameters


class CreateJobRequest(BaseModel):
    model: str
    training_file: str
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None       # {"type": "supervised", "supervised": {"hyperparameters": {...}}}
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    validation_file: str | None = None
    integrations: list | None = None
    metadata: dict | None = None

    def all_hyperparameters(self) -> dict:
        method = self.method or {}
        if method and method.get("type", "supervised") != "supervised":
            raise InvalidRequestError(f"method {method.get('type')!r} is not supported; this server trains "
                                      "supervised LoRA fine-tunes", field="method.type")
        nested = (method.get("supervised") or {}).get("hyperparameters") or {}
        return {**nested, **(self.hyperparameters or {})}


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def fine_tuning_router(async_engine, model_name: str, enabled: bool) -> APIRouter:
    router = APIRouter(prefix="/v1")
    engine = async_engine.engine
    files = FileStore()

    def trainer():
        """The engine's co-trainer; every route here is a 400 on a server without fine-tuning (uploads are
        kept for fine-tuning only)."""
        if not enabled or getattr(engine, "trainer", None) is None:
            raise InvalidRequestError("this server was started without fine-tuning (--enable-fine-tuning)",
                                      field="model")
        return engine.trainer

    @router.post("/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        trainer()
        return files.add(file.filename or "upload.jsonl", purpose, await file.read()).to_api()

    @router.get("/files")
    async def list_files():
        trainer()
        return {"object": "list", "data": [f.to_api() for f in files.list()], "has_more": False}

    @router.get("/files/{file_id}")
    async def get_file(file_id: str):
        trainer()
        return files.get(file_id).to_api()

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str):
        trainer()
        return Response(files.get(file_id).content, media_type="application/jsonl")

    @router.delete("/files/{file_id}")
    async def delete_file(file_id: str):
        trainer()
        files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/fine_tuning/jobs")
    async def create_job(body: CreateJobRequest):
        co = trainer()
        if body.model != model_name:
            raise InvalidRequestError(f"this server fine-tunes its base model {model_name!r} only, not "
                                      f"{body.model!r}", field="model")
        if body.validation_file is not None:
            raise InvalidRequestError("validation_file is not supported yet; remove it", field="validation_file")
        hp = Hyperparameters.parse(body.all_hyperparameters(), engine.lora.max_rank)
        content = files.get(body.training_file).content
        examples = await asyncio.to_thread(parse_training_file, content, engine.tokenizer, engine.max_model_len)
        job = FineTuningJob(FineTuningJob.new_id(), model_name, body.training_file, hp,
                            body.seed if body.seed is not None else secrets.randbelow(2**31), body.suffix, examples)
        await async_engine.call(lambda e: co.submit(job))
        return job.to_api()

    @router.get("/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = Query(default=20, ge=1, le=100)):
        jobs = sorted(trainer().jobs.values(), key=lambda j: j.created_at, reverse=True)
        return _page([j.to_api() for j in jobs], after, limit)

    @router.get("/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return trainer().get(job_id).to_api()

    @router.get("/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, limit: int = Query(default=20, ge=1, le=1000)):
        events = trainer().get(job_id).events_api(limit + 1)
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        co = trainer()
        job = await async_engine.call(lambda e: co.cancel(job_id))
        return job.to_api()

    return router
