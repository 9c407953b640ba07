"""How the server runs a model on Ray instances (kvloom/cluster): the `--instances` family of options, Ray's
start-up options, and a model's ClusterEngine (its own actors, global scheduler and rebalancer).

The single-model server makes one such front; the multi-model server (server/multi_model.py) makes one per
loaded model, so a model's requests are only ever placed on, and migrated between, that model's instances.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from kvloom.config import EngineConfig
from kvloom.errors import KvloomError

log = logging.getLogger("kvloom.serve")


@dataclass(frozen=True)
class ClusterOptions:
    instances: int = 1
    dispatch: str = "llumnix"
    ray_address: str | None = None        # 'auto': a running `ray start`; 'local' (or None): start one here
    threads_per_instance: int | None = None
    placement: str = "SPREAD"
    migration: bool = True

    @property
    def enabled(self) -> bool:
        return self.instances > 1 or bool(self.ray_address)

    def threads(self, config: EngineConfig) -> int:
        """Torch threads (and Ray CPUs) of each of a model's instances."""
        return self.threads_per_instance or config.num_threads or 1

    def describe(self) -> str:
        return (f"{self.instances} engine instances on Ray ({self.ray_address or 'local'}), dispatch {self.dispatch}, "
                f"migration {'on' if self.migration else 'off'}")

    def check(self, config: EngineConfig) -> None:
        """Refuse, before anything loads, what a cluster cannot run."""
        if self.instances < 1:
            raise KvloomError(f"--instances must be at least 1, got {self.instances}")
        if self.enabled and config.enable_fine_tuning:
            raise KvloomError("fine-tuning runs in a single instance for now; drop --instances/--ray-address or "
                              "--enable-fine-tuning")


def ray_init_options(address: str | None, cpus_needed: int) -> dict:
    """Join a running Ray cluster, or start a local one with room for every instance (Ray's CPUs are a
    count, not a pinning: more instance threads than cores is the user's choice to make)."""
    if address and address != "local":
        return {"address": address, "include_dashboard": False}
    return {"num_cpus": max(os.cpu_count() or 1, cpus_needed), "include_dashboard": False}


def cluster_engine(config: EngineConfig, engine, options: ClusterOptions, cpus_needed: int | None = None):
    """A ClusterEngine (not yet started) for the model of `config`; `engine` is the front's local view of it
    (tokenizer, limits, adapters' names): the instances run in Ray actors. cpus_needed sizes a local Ray
    started by this front (default: this model's instances)."""
    from kvloom.cluster.front import ClusterEngine
    threads = options.threads(config)
    front = ClusterEngine(config, options.instances, policy=options.dispatch, threads_per_instance=threads,
                          cpus_per_instance=threads,
                          ray_init=ray_init_options(options.ray_address, cpus_needed or options.instances * threads),
                          placement=options.placement)
    front.auto_rebalance = options.migration
    front.engine = engine
    return front
