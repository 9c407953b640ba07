"""FastAPI routes of the OpenAI-compatible server: auth, backpressure, errors, endpoints."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
import dataclasses
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvloom.system_info import engine_description
from kvloom.errors import InvalidRequestError, KvloomError, NotFoundError, PromptTooLongError, RequestFailedError
from kvloom.server.async_engine import AsyncEngine, EngineDeadError
from kvloom.server.cluster_routes import ClusterCollector, cluster_health, cluster_router
from kvloom.server.fine_tuning_routes import fine_tuning_router
from kvloom.server.limits import BodySizeLimit, ServerLimits
from kvloom.server.metrics import ServerMetrics
from kvloom.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LoadLoraRequest,
                                    TokenizeRequest, UnloadLoraRequest, error_body)
from kvloom.server.serving import OpenAIServing, message_dicts
from kvloom.server.web import PUBLIC_WEB_PATHS, web_router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | tuple[str, ...] | None = None   # one key, or one per tenant
    max_waiting_requests: int = 256
    limits: ServerLimits = ServerLimits()
    public_metrics: bool = False                    # /metrics without a key (for scrapers that carry none)

    @property
    def api_keys(self) -> tuple[str, ...]:
        keys = (self.api_key,) if isinstance(self.api_key, str) else tuple(self.api_key or ())
        return tuple(k for k in keys if k)


# Routes anyone may call when an API key is set (probes carry no key); /metrics too with public_metrics.
PUBLIC_PATHS = frozenset({"/health"}) | PUBLIC_WEB_PATHS  # web pages: kvloom/server/web.py


class _RequireApiKey:
    """Pure ASGI middleware: every HTTP route but the public ones needs `Authorization: Bearer <key>`, one of
    the server's keys; which one (the tenant) is left in scope["state"]["tenant"].

    Middleware rather than a per-router dependency, so no route (tokenize, server_info, the
    OpenAPI docs, ones added later) can be left open by forgetting it; pure ASGI rather than
    BaseHTTPMiddleware, which would hide client disconnects from the handlers. Every key is compared, in
    constant time, whichever matches: the time taken says nothing about any key.
    """

    def __init__(self, app, api_keys: tuple[str, ...], public: frozenset[str]):
        self.app = app
        self.expected = [f"Bearer {k}".encode() for k in api_keys]
        self.public = public

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.public:
            given = dict(scope["headers"]).get(b"authorization", b"")
            matches = [secrets.compare_digest(given, key) for key in self.expected]
            if not any(matches):
                response = _error(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["tenant"] = matches.index(True)
        await self.app(scope, receive, send)


class _EventStream(StreamingResponse):
    """An SSE response that, however it ends (finished, client gone, cancelled), closes its generators
    at once, which cancels and aborts their engine requests, and gives back its stream slot.

    Starlette only stops iterating the body when the client goes away; a generator left suspended
    (never started, or parked at a yield while a send was cut short) would hold its engine requests,
    their KV blocks and a batch slot until the garbage collector happened to finalize it.
    """

    def __init__(self, body, stream, release):
        super().__init__(body, media_type="text/event-stream")
        self._stream = stream
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            await self.body_iterator.aclose()
            await self._stream.aclose()


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def register_error_handlers(app: FastAPI) -> None:
    """Validation errors, HTTP errors and kvloom's typed errors answered in OpenAI's error shape."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"invalid field {param}: {first.get('msg', 'invalid request')}",
                      "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes, wrong methods, bodies that are not JSON: OpenAI's error shape like every other error.
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(KvloomError)
    async def on_kvloom_error(request: Request, exc: KvloomError):
        if isinstance(exc, PromptTooLongError):
            return _error(400, str(exc), "invalid_request_error", exc.field, "context_length_exceeded")
        if isinstance(exc, NotFoundError):
            return _error(404, str(exc), "not_found_error", exc.field)
        if isinstance(exc, InvalidRequestError):
            return _error(400, str(exc), "invalid_request_error", exc.field)
        if isinstance(exc, EngineDeadError):
            return _error(503, str(exc), "server_error", code="engine_dead")
        if isinstance(exc, RequestFailedError):
            return _error(500, str(exc), "server_error", code="request_failed")
        return _error(400, str(exc), "invalid_request_error")


def build_app(async_engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    engine = async_engine.engine
    serving = OpenAIServing(async_engine, engine.tokenizer, settings.model_name, engine.max_model_len, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not async_engine.is_alive:
            async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="kvloom", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.draining = False     # set on SIGTERM (server/launch.py): running requests finish, new ones get 503

    # ---- cross-cutting -----------------------------------------------------------------

    if settings.api_keys:
        public = PUBLIC_PATHS | ({"/metrics"} if settings.public_metrics else set())
        app.add_middleware(_RequireApiKey, api_keys=settings.api_keys, public=frozenset(public))
    limits = settings.limits
    # Added last, so it runs first: an oversized body is refused before anything else reads it.
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_request_bytes, too_large=lambda: _error(
        413, f"the request body is over this server's limit of {limits.max_request_bytes} bytes "
        "(--max-request-bytes)", "invalid_request_error", code="request_too_large"))

    register_error_handlers(app)

    def check_supported(body) -> None:
        if (name := body.unsupported_field()) is not None:
            raise InvalidRequestError(f"{name} is not supported by this server yet; remove it from the request",
                                      field=name)
        limits.check_body(body)

    # Streaming responses open per tenant (the API key's index; one tenant when the server has no key).
    open_streams: dict[int, int] = {}

    def stream_slot(request: Request):
        """A stream slot for the request's tenant, or a 429 when its streams are all open."""
        tenant = getattr(request.state, "tenant", 0)
        if open_streams.get(tenant, 0) >= limits.max_streams_per_key:
            metrics.requests.labels(outcome="rejected").inc()
            return None, _error(429, f"this API key already has {limits.max_streams_per_key} streams open "
                                "(--max-streams-per-key); close one or retry shortly", "rate_limit_error",
                                code="too_many_streams", headers={"Retry-After": "1"})
        open_streams[tenant] = open_streams.get(tenant, 0) + 1

        def release():
            open_streams[tenant] -= 1
        return release, None

    def adapters() -> dict:
        lora = getattr(engine, "lora", None)
        return lora.adapters if lora is not None else {}

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != settings.model_name and name not in adapters():
            served = [settings.model_name, *adapters()]
            return _error(404, f"model {name!r} does not exist; this server serves {', '.join(map(repr, served))}",
                          "not_found_error", "model", "model_not_found")
        return None

    # Requests accepted here that have not produced their first token yet (queued or prefilling).
    # Counted in the event loop, so the limit holds however fast requests arrive.
    waiting = {"n": 0}

    def overloaded() -> JSONResponse | None:
        if app.state.draining:
            metrics.requests.labels(outcome="rejected").inc()
            return _error(503, "the server is shutting down; send new requests elsewhere", "overloaded_error",
                          code="shutting_down")
        if waiting["n"] >= settings.max_waiting_requests:
            metrics.requests.labels(outcome="rejected").inc()
            return _error(503, "the server is at capacity; retry shortly", "overloaded_error",
                          headers={"Retry-After": "1"})
        return None

    def enter_queue():
        """Count a request as waiting from the moment it passes overloaded() (before any await, so the check
        and the count cannot be interleaved); returns the idempotent call that stops counting it."""
        waiting["n"] += 1
        left = []

        def leave():
            if not left:
                left.append(True)
                waiting["n"] -= 1
        return leave

    async def until_disconnect(request: Request, work):
        """Run work, cancelling it (and so aborting its engine requests) if the client goes away."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)

    # ---- OpenAI endpoints --------------------------------------------------------------

    v1 = APIRouter(prefix="/v1")

    async def off_loop(fn, *args):
        """Blocking work (templates and tokenizers, seconds for a few MB of prompt; file reads; calls to the
        cluster's actors) in a worker thread, so the event loop keeps serving every other client meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def respond(body, request: Request, translate, stream_body, response_body):
        """Translate the body into engine sub-requests (off the event loop) and queue them; answer with an event
        stream (holding one of the tenant's stream slots) or, once all finish, one JSON body."""
        if (err := check_model(body.model) or overloaded()) is not None:
            return err
        leave_queue = enter_queue()
        try:
            subs = await off_loop(translate, body)
            for sub in subs:   # a LoRA adapter's name as the model: the base model with that adapter
                sub.lora = body.model if body.model in adapters() else None
            return await queued(body, request, subs, stream_body, response_body, leave_queue)
        finally:
            leave_queue()

    async def queued(body, request: Request, subs, stream_body, response_body, leave_queue):
        limits.check_prompts([len(s.prompt_ids) for s in subs])
        release = None
        if body.stream:
            release, err = stream_slot(request)
            if err is not None:
                return err
        try:
            # Validation errors surface before a 200 is sent; a client that leaves while its request is still
            # queued frees its place (and never gets prefilled) at once, not at its first token.
            accepted = await until_disconnect(request, serving.accepted(subs))
        except BaseException:
            if release is not None:
                release()
            raise
        finally:
            leave_queue()       # it has its first output (or failed, or its client left): no longer waiting
        if isinstance(accepted, Response):
            if release is not None:
                release()
            return accepted
        first, stream = accepted
        if body.stream:
            return _EventStream(stream_body(subs, first, stream), stream, release)
        return await until_disconnect(request, response_body(subs, first, stream))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_supported(body)
        return await respond(body, request, serving.chat_subrequests,
                             lambda subs, first, stream: serving.chat_stream(subs, first, stream, body.include_usage),
                             lambda subs, first, stream: serving.chat_response(subs, first, stream))

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_supported(body)
        return await respond(
            body, request, serving.completion_subrequests,
            lambda subs, first, stream: serving.completion_stream(subs, first, stream, body.include_usage, body.echo),
            lambda subs, first, stream: serving.completion_response(subs, first, stream, body.echo))

    @v1.delete("/sessions/{session_id}")
    async def close_session(session_id: str):
        released = await async_engine.close_session(session_id)
        return {"id": session_id, "object": "session", "deleted": released}

    @v1.get("/models")
    async def models():
        now = int(time.time())
        base = {"id": settings.model_name, "object": "model", "created": now, "owned_by": "kvloom",
                "max_model_len": engine.max_model_len, "root": engine.source.name, "parent": None}
        loras = [{"id": name, "object": "model", "created": now, "owned_by": "kvloom",
                  "max_model_len": engine.max_model_len, "root": adapter.path, "parent": settings.model_name}
                 for name, adapter in adapters().items()]
        return {"object": "list", "data": [base, *loras]}

    def require_lora() -> None:
        if getattr(engine, "lora", None) is None:
            raise InvalidRequestError("this server was started without LoRA (--enable-lora or --lora-modules)",
                                      field="lora_name")
        if clustered:   # every instance must hold the same set, and restarted instances load the config's
            raise InvalidRequestError("with --instances, the adapters are the ones given at start with "
                                      "--lora-modules; loading and unloading at run time is not supported",
                                      field="lora_name")

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        require_lora()
        if body.lora_name == settings.model_name:
            raise InvalidRequestError("an adapter cannot take the base model's name", field="lora_name")
        adapter = await off_loop(engine.read_lora, body.lora_name, body.lora_path)   # file reads off the loop
        await async_engine.call(lambda e: e.add_lora(adapter))
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": True}

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest):
        require_lora()
        await async_engine.call(lambda e: e.unload_lora(body.lora_name))
        return {"object": "lora_adapter", "id": body.lora_name, "loaded": False}

    app.include_router(v1)

    # ---- operations --------------------------------------------------------------------

    clustered = hasattr(async_engine, "instances")      # a ClusterEngine: kvloom/cluster/front.py
    if clustered:
        metrics.registry.register(ClusterCollector(async_engine))
        app.include_router(cluster_router(async_engine))
    app.include_router(fine_tuning_router(async_engine, settings.model_name, enabled=not clustered))

    @app.get("/health", response_class=Response)
    async def health():
        if app.state.draining:
            return _error(503, "the server is shutting down", "server_error", code="shutting_down")
        if async_engine.is_alive and clustered:
            code, body = cluster_health(async_engine)
            return JSONResponse(body, status_code=code)
        if async_engine.is_alive:
            return Response(status_code=200)
        reason = f" ({async_engine._dead!r}); restart the server" if async_engine._dead is not None else ""
        return _error(503, f"the engine loop is not running{reason}", "server_error", code="engine_dead")

    async def refresh_metrics() -> None:
        """Under a cluster the engines run in the actors: the server-wide series are read from them now."""
        if clustered:
            metrics.observe_cluster(await off_loop(async_engine.dashboard_stats))
    app.state.refresh_metrics = refresh_metrics    # the multi-model front's /metrics calls it for each model

    @app.get("/metrics")
    async def prometheus_metrics():
        await refresh_metrics()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/server_info")
    async def server_info():
        info = {"served_model_name": settings.model_name, "max_waiting_requests": settings.max_waiting_requests,
                "limits": dataclasses.asdict(limits),
                **engine_description(engine)}
        return {**info, **await cluster_info()}

    async def cluster_info() -> dict:
        """The instances (and the dispatch policy) of a cluster front; nothing for a single engine."""
        if not clustered:
            return {}
        return {"instances": await off_loop(async_engine.instances), "dispatch": async_engine.policy_name}
    app.state.cluster_info = cluster_info          # the multi-model front's /server_info shows it per model

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (err := check_model(body.model)) is not None:
            return err
        tok = engine.tokenizer
        if body.messages is not None:
            ids = await off_loop(tok.apply_chat_template, message_dicts(body.messages), body.add_generation_prompt)
        elif body.prompt is not None:
            ids = await off_loop(lambda: tok.hf.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        else:
            raise InvalidRequestError("give a prompt or messages", field="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if (err := check_model(body.model)) is not None:
            return err
        vocab = engine.model.shape.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", field="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # ---- web pages: chat at /, dashboard at /dashboard (kvloom/server/web.py) ----------

    metrics.set_model_name(settings.model_name)  # label model_name of the vllm:* series
    async def cluster_stats():
        return await off_loop(async_engine.dashboard_stats)

    app.include_router(web_router(settings, metrics, cluster_stats if clustered else None))

    return app
