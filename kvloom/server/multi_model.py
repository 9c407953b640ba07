"""`kvloom serve --model a=PATH --model b=PATH2 [--route NAME=POLICY]`: several models behind one server.

Each model is a whole single-model server (server/app.py build_app: its engine thread, metrics, limits) held by
the ModelRegistry, loaded on demand; with --instances, its engine is a ClusterEngine of its own (its Ray actors,
global scheduler and rebalancer: server/cluster_serving.py), so a model's requests stay on its instances. This
front reads a request's `model` and hands the request, untouched, to that model's app; `"auto"` or a route's
name lets a router (kvloom/router) choose, and the answer then carries `"kvloom": {"route": {"model", "policy",
"reason"}}`. The single-model server does not go through here at all.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric

from kvloom.config import EngineConfig
from kvloom.engine.openmp_pool import release_openmp_workers
from kvloom.errors import InvalidRequestError, NotFoundError
from kvloom.router.routes import AUTO, BanditRoute, CascadeRoute, RouteSpec, build_routes
from kvloom.router.cascade import TOP_FOR_ENTROPY
from kvloom.router.features import request_text
from kvloom.server.app import PUBLIC_PATHS, ServerSettings, _error, _RequireApiKey, build_app, register_error_handlers
from kvloom.server.async_engine import AsyncEngine
from kvloom.server.cluster_serving import ClusterOptions, cluster_engine
from kvloom.server.limits import BodySizeLimit, ServerLimits
from kvloom.server.metrics import ServerMetrics
from kvloom.server.model_registry import LoadedModel, ModelRegistry
from kvloom.system_info import engine_description

log = logging.getLogger("kvloom.serve")

# Requests whose body names a model; every other route goes to the default (first) model's app.
MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"})
_DECISIONS_KEPT = 10_000       # routed responses whose feedback is still accepted (oldest forgotten first)


def split_threads(configs: dict[str, EngineConfig], max_loaded: int, instances: int = 1) -> dict[str, EngineConfig]:
    """Give each model that has no --num-threads an equal share of the cores among the models loaded at once
    (with a cluster: among their instances, each model having `instances`)."""
    at_once = min(len(configs), max_loaded or len(configs)) * instances
    share = max(1, (os.cpu_count() or 1) // at_once)
    return {n: c if c.num_threads else dataclasses.replace(c, num_threads=share) for n, c in configs.items()}


def model_loader(configs: dict[str, EngineConfig], max_waiting_requests: int = 256,
                 limits: ServerLimits = ServerLimits(), tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None, cluster: ClusterOptions = ClusterOptions()):
    """name -> LoadedModel: the engine built and its loop thread started, or, with a cluster, the model's own
    ClusterEngine with its instances (Ray actors) started (blocking: run in a worker thread). Unloading shuts
    the front down, which ends its actors and frees their placement group."""
    from kvloom.engine.engine import Engine

    def load(name: str) -> LoadedModel:
        engine = Engine(configs[name])    # with a cluster: the front's view (tokenizer, limits); actors run it
        engine.tool_call_parser, engine.reasoning_parser = tool_call_parser, reasoning_parser
        metrics = ServerMetrics()
        if cluster.enabled:
            async_engine = cluster_engine(configs[name], engine, cluster)
        else:
            async_engine = AsyncEngine(engine, on_step=metrics.observe_engine)
        app = build_app(async_engine, ServerSettings(name, None, max_waiting_requests, limits), metrics)
        try:
            async_engine.start()
        except BaseException:
            async_engine.shutdown()      # actors that did start are not left running
            raise
        if not cluster.enabled:
            # The loader thread's pool would throttle the engine thread's (engine/openmp_pool.py). It may load
            # another model later, so it keeps its thread count and builds a pool again for that load.
            release_openmp_workers()
        return LoadedModel(app, async_engine, metrics)
    return load


class _PerModelMetrics:
    """Every loaded model's series in one exposition: kvloom's names gain a model_name label (vLLM's carry it)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def collect(self):
        families: dict[str, Metric] = {}
        for name, loaded in self.registry.loaded().items():
            for fam in loaded.metrics.registry.collect():
                merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                for s in fam.samples:
                    merged.samples.append(s._replace(labels={"model_name": name, **s.labels}))
        yield from families.values()


class _Capture:
    """An ASGI send that keeps a whole (non-streamed) response, to be read and rewritten."""

    def __init__(self):
        self.status = 500
        self.headers: list = []
        self.body = b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status, self.headers = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    async def replay(self, send, body: bytes | None = None) -> None:
        body = self.body if body is None else body
        headers = [(k, v) for k, v in self.headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replayed(body: bytes, receive):
    """A receive that gives the already-read body once, then the client's own messages (its disconnect)."""
    sent = []

    async def receive_again():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return receive_again


def _token_logprobs(answer: dict) -> tuple[list[float], list[list[float]]]:
    """The chosen tokens' logprobs of choice 0 and each step's top alternatives' logprobs, chat or completion
    shape."""
    lps = (answer.get("choices") or [{}])[0].get("logprobs") or {}
    if "content" in lps:
        steps = lps["content"] or []
        return [t["logprob"] for t in steps], [[a["logprob"] for a in t.get("top_logprobs") or []] for t in steps]
    return ([x for x in lps.get("token_logprobs") or [] if x is not None],
            [list(top.values()) for top in lps.get("top_logprobs") or [] if top])


def build_multi_model_app(registry: ModelRegistry, route_specs: list[RouteSpec] = (),
                          api_key: str | tuple[str, ...] | None = None, limits: ServerLimits = ServerLimits(),
                          public_metrics: bool = False):
    names = list(registry.slots)
    routes = build_routes(list(route_specs), names)
    if AUTO not in routes and len(names) > 1:   # "auto" is the first route, else a bandit over every model
        routes[AUTO] = next(iter(routes.values())) if routes else BanditRoute(RouteSpec(AUTO, "bandit"), names)
    metrics_registry = CollectorRegistry()
    route_total = Counter("kvloom_route", "Routed requests by route and the model that answered",
                          ["route", "model"], registry=metrics_registry)
    escalations = Counter("kvloom_route_escalations", "Cascade answers escalated to the big model", ["route"],
                          registry=metrics_registry)
    feedback_total = Counter("kvloom_route_feedback", "Feedback scores received by route", ["route"],
                             registry=metrics_registry)
    metrics_registry.register(_PerModelMetrics(registry))
    decisions: OrderedDict[str, tuple[str, str, object]] = OrderedDict()   # response id -> (route, model, x)

    @asynccontextmanager
    async def lifespan(app):
        reaper = asyncio.ensure_future(registry.reap_idle()) if registry.idle_seconds > 0 else None
        await registry.acquire(registry.default)        # the default model is ready before the first request
        registry.release(registry.default)
        yield
        if reaper is not None:
            reaper.cancel()
        await registry.close()

    front = FastAPI(title="kvloom", lifespan=lifespan)
    front.state.draining = False

    @front.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": n, "object": "model", "created": now, "owned_by": "kvloom",
                 "kvloom": {"loaded": s.loaded is not None, "default": n == registry.default}}
                for n, s in registry.slots.items()]
        data += [{"id": r, "object": "model", "created": now, "owned_by": "kvloom",
                  "kvloom": {"route": route.policy}} for r, route in routes.items()]
        return {"object": "list", "data": data}

    @front.post("/v1/feedback")
    async def feedback(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequestError("the body must be JSON: {\"id\": response id, \"score\": number in [0, 1]}")
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise InvalidRequestError("give the routed response's id as a string", field="id")
        score = body.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0.0 <= score <= 1.0:
            raise InvalidRequestError("score must be a number in [0, 1] (the answer's quality)", field="score")
        if body["id"] not in decisions:
            raise NotFoundError(f"no routed response {body['id']!r} is awaiting feedback here (unknown, not routed "
                                f"by a bandit, or older than the last {_DECISIONS_KEPT} routed)", field="id")
        route_name, model, x = decisions.pop(body["id"])
        reward = routes[route_name].feedback(model, x, float(score))
        feedback_total.labels(route=route_name).inc()
        return {"id": body["id"], "object": "feedback", "route": route_name, "model": model, "reward": reward}

    @front.get("/metrics")
    async def prometheus_metrics():
        for loaded in list(registry.loaded().values()):
            await loaded.app.state.refresh_metrics()
        return Response(generate_latest(metrics_registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @front.get("/health", response_class=Response)
    async def health():
        if front.state.draining:
            return _error(503, "the server is shutting down", "server_error", code="shutting_down")
        dead = [n for n, m in registry.loaded().items() if not m.async_engine.is_alive]
        if dead:
            return _error(503, f"the engine loop of {', '.join(dead)} is not running; restart the server",
                          "server_error", code="engine_dead")
        return Response(status_code=200)

    @front.get("/server_info")
    async def server_info():
        return {"served_model_names": names, "default_model": registry.default,
                "max_loaded_models": registry.max_loaded, "model_idle_seconds": registry.idle_seconds,
                "loads": registry.loads, "unloads": registry.unloads,
                "routes": {r: route.policy for r, route in routes.items()},
                "loaded": {n: {**engine_description(m.async_engine.engine), **await m.app.state.cluster_info()}
                           for n, m in list(registry.loaded().items())}}

    register_error_handlers(front)

    async def forward(name: str, body: bytes | None, scope, receive, send) -> None:
        try:
            loaded = await registry.acquire(name)
        except Exception as e:   # noqa: BLE001 - a model that cannot load fails its requests, not the server
            log.error("model %s: could not be loaded: %s", name, e)
            return await _error(500, f"model {name!r} could not be loaded: {e}", "server_error",
                                code="model_load_failed")(scope, receive, send)
        try:
            await loaded.app(scope, receive if body is None else _replayed(body, receive), send)
        finally:
            registry.release(name)

    async def routed(route_name: str, data: dict, scope, receive, send) -> None:
        route = routes[route_name]
        if isinstance(route, CascadeRoute):
            return await cascade(route_name, route, data, scope, receive, send)
        model, x, reason = route.decide(request_text(data))
        info = {"model": model, "policy": route.policy, "route": route_name, "reason": reason}
        body = json.dumps({**data, "model": model}).encode()
        if data.get("stream"):
            async def tagged(message):   # a stream's route is told in headers; its id is read off its first chunk
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-kvloom-route-model", model.encode()),
                                                      (b"x-kvloom-route-policy", route.policy.encode())]}
                elif message["type"] == "http.response.body" and not tagged.seen:
                    m = re.search(rb'"id":\s*"([^"]+)"', message.get("body", b""))
                    if m:
                        tagged.seen = True
                        remember(m.group(1).decode(), route_name, model, x)
                await send(message)
            tagged.seen = False
            await forward(model, body, scope, receive, tagged)
            route_total.labels(route=route_name, model=model).inc()
            return
        answer = _Capture()
        await forward(model, body, scope, receive, answer)
        route_total.labels(route=route_name, model=model).inc()
        out = answer.json()
        if answer.status != 200 or not isinstance(out, dict):
            return await answer.replay(send)
        remember(out.get("id"), route_name, model, x)
        await answer.replay(send, json.dumps(_with_route(out, info)).encode())

    def remember(response_id, route_name, model, x) -> None:
        if isinstance(response_id, str):
            decisions[response_id] = (route_name, model, x)
            while len(decisions) > _DECISIONS_KEPT:
                decisions.popitem(last=False)

    async def cascade(route_name: str, route: CascadeRoute, data: dict, scope, receive, send) -> None:
        if data.get("stream"):
            raise InvalidRequestError(f"route {route_name!r} is a cascade, which must see the small model's whole "
                                      "answer before it can answer: send stream=false", field="stream")
        chat = scope["path"] == "/v1/chat/completions"
        wants_logprobs = data.get("logprobs") not in (None, False)
        tops = TOP_FOR_ENTROPY if route.measure == "neg_entropy" else 0
        small_body = {**data, "model": route.small, **({"logprobs": True, "top_logprobs": tops or
                                                         data.get("top_logprobs")} if chat else
                                                        {"logprobs": max(tops, data.get("logprobs") or 0)})}
        started = time.perf_counter()
        small = _Capture()
        await forward(route.small, json.dumps(small_body).encode(), scope, receive, small)
        out = small.json()
        if small.status != 200 or not isinstance(out, dict):
            return await small.replay(send)
        escalate, reason = route.judge(*_token_logprobs(out))
        small_seconds = time.perf_counter() - started
        info = {"model": route.small, "policy": route.policy, "route": route_name, "reason": reason,
                "small_usage": out.get("usage"), "small_seconds": small_seconds}
        if escalate:
            escalations.labels(route=route_name).inc()
            big = _Capture()
            await forward(route.big, json.dumps({**data, "model": route.big}).encode(), scope, receive, big)
            out = big.json()
            if big.status != 200 or not isinstance(out, dict):
                return await big.replay(send)
            info["model"] = route.big
        elif not wants_logprobs:
            for choice in out.get("choices", []):
                choice["logprobs"] = None
        route_total.labels(route=route_name, model=info["model"]).inc()
        await small.replay(send, json.dumps(_with_route(out, info)).encode())

    async def dispatch(scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in MODEL_PATHS or scope["method"] != "POST":
            if scope["type"] == "http" and scope["path"] not in front_paths:
                return await to_default(scope, receive, send)
            return await front(scope, receive, send)
        if front.state.draining:
            return await _error(503, "the server is shutting down; send new requests elsewhere", "overloaded_error",
                                code="shutting_down")(scope, receive, send)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            name = registry.default    # the default model's app answers a body it cannot read with a 400
        if name in registry.slots:
            return await forward(name, body, scope, receive, send)
        if name in routes and scope["path"] in ("/v1/chat/completions", "/v1/completions"):
            try:
                return await routed(name, data, scope, receive, send)
            except InvalidRequestError as e:
                return await _error(400, str(e), "invalid_request_error", e.field)(scope, receive, send)
        served = [*names, *routes]
        await _error(404, f"model {name!r} does not exist; this server serves {', '.join(map(repr, served))}",
                     "not_found_error", "model", "model_not_found")(scope, receive, send)

    front_paths = {r.path for r in front.routes}

    async def to_default(scope, receive, send):
        """Any other route (sessions, LoRA, web pages) is the default model's; its body is read by its app."""
        await forward(registry.default, None, scope, receive, send)

    app = dispatch
    if keys := ServerSettings("", api_key).api_keys:
        app = _RequireApiKey(app, keys, frozenset(PUBLIC_PATHS | ({"/metrics"} if public_metrics else set())))
    app = BodySizeLimit(app, limits.max_request_bytes, lambda: _error(
        413, f"the request body is over this server's limit of {limits.max_request_bytes} bytes "
        "(--max-request-bytes)", "invalid_request_error", code="request_too_large"))
    app.state = front.state        # launch.py's clean exit sets state.draining on SIGTERM
    app.front, app.registry, app.routes = front, registry, routes
    return app


def _with_route(answer: dict, info: dict) -> dict:
    """The answer with kvloom's extension object (other kvloom extensions in it are kept)."""
    return {**answer, "kvloom": {**(answer.get("kvloom") or {}), "route": info}}
