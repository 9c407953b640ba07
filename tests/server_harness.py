"""Run a kvloom server in a background thread of the test process, on a free loopback port."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.server.app import ServerSettings, build_app
from kvloom.server.async_engine import AsyncEngine
from kvloom.server.limits import ServerLimits
from kvloom.server.metrics import ServerMetrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, engine: Engine, name: str = "tiny", api_key: str | tuple[str, ...] | None = None,
                 max_waiting_requests: int = 256, limits: ServerLimits = ServerLimits(), public_metrics: bool = False):
        self.engine = engine
        self.port = free_port()
        self.metrics = ServerMetrics()
        self.async_engine = AsyncEngine(engine, on_step=self.metrics.observe_engine)
        settings = ServerSettings(name, api_key, max_waiting_requests, limits, public_metrics)
        self.app = app = build_app(self.async_engine, settings, self.metrics)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def tiny_engine(model_dir: str, **kw) -> Engine:
    # A small pool: the default 1 GiB per test server adds up to the machine's memory over a whole run.
    kw.setdefault("kv_cache_memory", 64 << 20)
    return Engine(EngineConfig(model=model_dir, **kw))


def slowed(engine, seconds=0.02):
    """Each step takes at least `seconds`: a request of 150 tokens then lasts ~3 s, long enough to walk away from."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()
    engine.step = slow_step
    return engine


class MultiServerThread(ServerThread):
    """A multi-model server (kvloom/server/multi_model.py) over {name: model directory}, in a background thread."""

    def __init__(self, model_dirs: dict[str, str], routes=(), max_loaded: int = 0, idle_seconds: float = 0.0,
                 api_key: str | None = None, cluster=None, **engine_kw):
        """cluster: a ClusterOptions (kvloom/server/cluster_serving.py): each model on its own Ray instances
        (Ray already initialized by the caller)."""
        from kvloom.server.cluster_serving import ClusterOptions
        from kvloom.server.model_registry import ModelRegistry
        from kvloom.server.multi_model import build_multi_model_app, model_loader
        engine_kw.setdefault("kv_cache_memory", 64 << 20)
        configs = {n: EngineConfig(model=d, **engine_kw) for n, d in model_dirs.items()}
        load = model_loader(configs, cluster=cluster or ClusterOptions())
        self.loads = []                  # every LoadedModel made, in order: (name, model)

        def recorded(name):
            self.loads.append((name, load(name)))
            return self.loads[-1][1]
        self.registry = ModelRegistry(list(configs), recorded, max_loaded, idle_seconds)
        self.port = free_port()
        self.app = build_multi_model_app(self.registry, list(routes), api_key)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
