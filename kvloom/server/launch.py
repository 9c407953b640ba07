"""`kvloom serve`: build the engine, log what is in force, run uvicorn until SIGTERM/SIGINT."""
from __future__ import annotations

import dataclasses
import logging

import uvicorn

from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.engine.openmp_pool import leave_compute_to_engine_thread
from kvloom.errors import KvloomError
from kvloom.server.app import ServerSettings, build_app
from kvloom.server.async_engine import AsyncEngine
from kvloom.server.cluster_serving import ClusterOptions, cluster_engine, ray_init_options
from kvloom.server.heap import freeze_startup_heap
from kvloom.server.limits import ServerLimits
from kvloom.server.metrics import ServerMetrics

log = logging.getLogger("kvloom.serve")


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | tuple[str, ...] | None = None, limits: ServerLimits = ServerLimits(),
          public_metrics: bool = False,
          served_model_name: str | None = None, max_waiting_requests: int = 256,
          graceful_shutdown_s: float = 30.0, cluster: ClusterOptions = ClusterOptions(),
          tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> None:
    cluster.check(config)
    engine = Engine(config)
    name = served_model_name or engine.source.name
    resolved = engine.config      # quantization and KV dtype "auto" resolved
    log.info("model %s: %.1fM parameters, %s, quantization %s, %d layers, context %d tokens", name,
             engine.model.num_parameters() / 1e6, config.dtype, resolved.quantization, engine.model.shape.num_layers,
             engine.max_model_len)
    log.info("KV cache: %d blocks of %d tokens = %d tokens in %.0f MiB (%s)", engine.num_blocks, config.block_size,
             engine.kv_capacity_tokens, config.kv_cache_memory / 2**20, resolved.kv_cache_dtype)
    if config.speculative != "none":
        log.info("speculative decoding: %s, up to %d draft tokens, %d branches", config.speculative,
                 config.spec_max_tokens, config.spec_branches)
    log.info("scheduler: max_num_seqs=%d max_num_batched_tokens=%d max_waiting_requests=%d tpot_target_ms=%s",
             config.max_num_seqs, config.max_num_batched_tokens, max_waiting_requests, config.tpot_target_ms)
    metrics = ServerMetrics()
    if cluster.enabled:
        # Ray actors run the instances; the local engine only answers for the tokenizer and limits.
        async_engine = cluster_engine(config, engine, cluster)
        log.info("cluster: %s, %d threads each", cluster.describe(), cluster.threads(config))
    else:
        async_engine = AsyncEngine(engine, on_step=metrics.observe_engine)
    # Read by server/serving.py (the chat output's parsers): the app is built from the engine alone.
    engine.tool_call_parser, engine.reasoning_parser = tool_call_parser, reasoning_parser
    # The grammar library's view of the vocabulary takes ~0.5 s to build: build it now, in the background,
    # rather than in the first constrained request's time to first token.
    from kvloom.structured import StructuredOutputs
    engine.grammars.submit(StructuredOutputs(json_object=True))
    settings = ServerSettings(name, api_key, max_waiting_requests, limits, public_metrics)
    app = build_app(async_engine, settings, metrics)
    log.info("limits: %s", ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(limits).items()))
    log.info("serving %s at http://%s:%d/v1%s", name, host, port,
             f" ({len(settings.api_keys)} API key(s) required)" if settings.api_keys else "")
    if not cluster.enabled and leave_compute_to_engine_thread():
        log.info("OpenMP: the event loop's workers released; the engine thread computes on %d threads",
                 engine.compute_threads)
    log.info("garbage collector: %d objects made at start-up frozen out of full collections",
             freeze_startup_heap())
    # uvicorn stops accepting on SIGTERM/SIGINT, lets open requests finish within the grace period,
    # then runs the lifespan shutdown, which stops the engine thread.
    _CleanExitServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                    timeout_graceful_shutdown=graceful_shutdown_s)).run()


def serve_models(configs: dict[str, EngineConfig], routes=(), max_loaded_models: int = 0,
                 model_idle_seconds: float = 0.0, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | tuple[str, ...] | None = None, limits: ServerLimits = ServerLimits(),
                 public_metrics: bool = False, max_waiting_requests: int = 256, graceful_shutdown_s: float = 30.0,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 cluster: ClusterOptions = ClusterOptions()) -> None:
    """Several models behind one server (server/multi_model.py); the first is the default. With a cluster,
    each loaded model has its own `cluster.instances` Ray actors behind its own ClusterEngine."""
    from kvloom.server.model_registry import ModelRegistry
    from kvloom.server.multi_model import build_multi_model_app, model_loader, split_threads
    if max_loaded_models < 0 or model_idle_seconds < 0:
        raise KvloomError("--max-loaded-models and --model-idle-seconds must be >= 0 (0: no limit)")
    for c in configs.values():
        cluster.check(c)
    configs = split_threads(configs, max_loaded_models, cluster.instances if cluster.enabled else 1)
    for name, c in configs.items():
        log.info("model %s: %s, %d torch threads%s (the cores split among the %s loaded at once)", name,
                 c.model or "built-in default", cluster.threads(c) if cluster.enabled else c.num_threads,
                 f" x {cluster.instances} instances" if cluster.enabled else "",
                 "models' instances" if cluster.enabled else "models")
    if cluster.enabled:
        # One Ray for every model's instances, started here (the main thread) with room for all the models
        # loaded at once; each model's placement group is made when it loads and removed when it unloads.
        import ray
        at_once = min(len(configs), max_loaded_models or len(configs))
        ray.init(**ray_init_options(cluster.ray_address,
                                    at_once * max(cluster.instances * cluster.threads(c) for c in configs.values())))
        log.info("cluster: each model on %s", cluster.describe())
    registry = ModelRegistry(list(configs), model_loader(configs, max_waiting_requests, limits, tool_call_parser,
                                                        reasoning_parser, cluster), max_loaded_models,
                             model_idle_seconds)
    app = build_multi_model_app(registry, routes, api_key, limits, public_metrics)
    log.info("serving %s at http://%s:%d/v1 (default %s; at most %d loaded; idle unload %s; routes %s)",
             ", ".join(configs), host, port, registry.default, registry.max_loaded,
             f"after {model_idle_seconds:g} s" if model_idle_seconds else "off",
             ", ".join(f"{n}={r.policy}" for n, r in app.routes.items()) or "none")
    _CleanExitServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                    timeout_graceful_shutdown=graceful_shutdown_s)).run()


class _CleanExitServer(uvicorn.Server):
    """A stop asked for by SIGTERM/SIGINT ends with exit code 0.

    uvicorn re-raises the captured signal after its graceful shutdown, which
    makes the process die by that signal; a service manager would call that a crash.
    """

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.draining = True   # requests still reaching the app get 503, /health too
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
