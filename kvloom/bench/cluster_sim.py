"""`kvloom bench cluster-sim`: many engine instances behind the global scheduler, by discrete-event simulation.

What is real and what is modelled:
  real      each instance's Scheduler (Dynamic SplitFuse, preemption) over its own BlockPool; the global
            scheduler's dispatch policies (cluster/dispatch.py), load reports (cluster/load.py) and
            migration triggers (cluster/rebalance.py plan_moves), called exactly as the Ray front calls them.
  modelled  the runner: no model runs; each sampled chunk gets token 0, and a request ends at its trace
            output length (ignore_eos, max_tokens). A step takes the time the step-cost model
            (speculation/step_cost.py StepCost) gives for its plan. A migration is Llumnix's pre-copy in
            one round: the blocks the request holds are copied to blocks reserved on the destination
            while it keeps decoding on the source; then it stops at a step boundary, the blocks filled
            meanwhile are copied (the downtime), and it resumes on the destination with its computed
            tokens intact (what Engine.export_request / import_request do, at the scheduler level).

Time is simulated, so results do not depend on how busy this machine is; only the sweep's wall time does.
"""
from __future__ import annotations

import heapq
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kvloom.bench.workloads import _clip, find_trace, read_trace
from kvloom.cluster.dispatch import make_policy
from kvloom.cluster.load import load_report
from kvloom.cluster.rebalance import RebalanceSettings, plan_moves
from kvloom.engine.request import Request, RequestStatus
from kvloom.engine.scheduler import Scheduler
from kvloom.kv.block_pool import BlockPool
from kvloom.sampling_params import SamplingParams
from kvloom.speculation.step_cost import StepCost

POLICIES = ["round-robin", "least-loaded", "power-of-two", "llumnix"]
SLO = {"ttft": 2.0, "tpot": 0.2}      # seconds: a request is "good" when it meets both
# Requests a second per instance, per trace: near each trace's knee on 8 instances (round-robin, no
# migration: 90% and 68% within the SLO), so policies and migration have something to fix. azure-code's
# prompts (mean ~2000 tokens) are prefill-bound even at 0.2 (49% within the SLO).
DEFAULT_RATES = {"burstgpt": 1.2, "azure-conv": 0.8, "azure-code": 0.2}

# Step cost of the default model (SmolLM2-135M, w8a8, native decode stack, 2 threads) on this machine, as
# docs/performance.md records it: batch-1 decode 7.57 ms a token, 32 decodes 44.3 ms a step, 64 decodes
# 101.2 ms; a 128-token prompt 84 ms on the module path (prompt chunks always take it), 1 token ~15 ms
# there. per_context_token: "~0.2 ms a row at 200 tokens" (the speculation notes). per_chunk is not in the
# docs: 0.5 ms is an assumption. Measuring at start-up on a shared, loaded machine gave nonsense (a 1.6 s
# pass), which is why these recorded numbers are the default; --step-cost takes a measured JSON instead.
DOC_STEP_COST = dict(sizes=[1, 128], seconds=[0.0151, 0.084], per_chunk=0.0005,
                     decode_sizes=[1, 32, 64], decode_seconds=[0.00757, 0.0443, 0.1012], per_context_token=1e-6)


def default_step_cost() -> StepCost:
    return StepCost(**DOC_STEP_COST)


def load_step_cost(path: str) -> StepCost:
    """A StepCost from JSON with StepCost's constructor fields (e.g. dumped after StepCost.measure)."""
    with open(path) as f:
        d = json.load(f)
    return StepCost(**{k: d[k] for k in DOC_STEP_COST if k in d})


def step_seconds(cost: StepCost, plan, requests: dict[str, Request]) -> float:
    """The plan's forward pass, as the speculator prices one (lookahead.py pass_cost): decode-only steps on
    the native stack, mixed steps on the module path with one attention call per chunk, plus each decode
    row's reading of its context."""
    context = sum(c.start_pos for c in plan.decodes)
    if not plan.spans:
        return cost.decode_only(len(plan.decodes)) + context * cost.per_context_token
    chunks = len(plan.spans) + (1 if plan.decodes else 0)
    return cost(plan.num_tokens) + (chunks - 1) * cost.per_chunk + context * cost.per_context_token


@dataclass
class SimConfig:
    num_instances: int
    policy: str = "llumnix"
    migration: bool = False
    num_blocks: int = 1456            # the default engine's pool: 1 GiB of fp32 KV for SmolLM2-135M
    block_size: int = 16
    max_num_seqs: int = 32            # the tuned serving setting of docs/performance.md (32 / 256)
    max_num_batched_tokens: int = 256
    max_model_len: int = 8192         # SmolLM2's context (the pool holds more)
    rebalance_interval: float = 0.2   # the Ray front's defaults (cluster/front.py)
    move_cooldown: float = 2.0
    # Migration cost: per KV block copied (a 16-token fp32 block of SmolLM2 is 737 KB; ~5 GB/s through
    # Ray's local object store is an assumption) plus a fixed stop/resume cost (two actor calls).
    copy_seconds_per_block: float = 0.00015
    stop_seconds: float = 0.002
    seed: int = 0


@dataclass
class Trip:
    """One request end to end, on the simulated clock."""
    arrival: float
    input_len: int
    output_len: int
    first_token: float | None = None
    end: float | None = None
    instance: int = -1
    last_token: float | None = None
    max_gap: float = 0.0          # the longest pause between two of its tokens (preemption, migration)
    preemptions: int = 0
    moves: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        return None if self.output_len < 2 else (self.end - self.first_token) / (self.output_len - 1)


@dataclass
class Migration:
    request_id: str
    src: int
    dst: int
    reason: str
    reserved: list[int] = field(default_factory=list)    # blocks pre-allocated on dst (pre-copied into)
    ready: bool = False                                   # pre-copy done: stop it at the next boundary


class Instance:
    """One engine instance: the real scheduler and pool, and the step in flight."""

    def __init__(self, iid: int, cfg: SimConfig):
        self.id = iid
        self.pool = BlockPool(cfg.num_blocks)
        self.sched = Scheduler(self.pool, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.plan = None            # the step in flight (None: idle)
        self.version = 0            # bumped on every change: load reports are cached per version
        self._report = None

    def report(self, block_size: int):
        if self._report is None or self._report[0] != self.version:
            self._report = (self.version, load_report(self.id, self.sched, self.pool, block_size))
        return self._report[1]


class ClusterSim:
    def __init__(self, cfg: SimConfig, requests: list[tuple[float, int, int]], step_cost: StepCost | None = None):
        """requests: (arrival seconds, input tokens, output tokens), clipped to cfg.max_model_len here."""
        self.cfg = cfg
        self.cost = step_cost or default_step_cost()
        self.instances = [Instance(i, cfg) for i in range(cfg.num_instances)]
        self.policy = make_policy(cfg.policy)
        self.rng = random.Random(cfg.seed)       # power-of-two's random pairs
        self.trips: list[Trip] = []
        for t, n_in, n_out in requests:
            n_in, n_out, _ = _clip(n_in, n_out, min(cfg.max_model_len, cfg.num_blocks * cfg.block_size))
            self.trips.append(Trip(t, n_in, n_out))
        self.clipped = sum(1 for (_, i, o), tr in zip(requests, self.trips) if (i, o) != (tr.input_len, tr.output_len))
        self._events: list = []
        self._seq = 0
        self.moving: dict[str, Migration] = {}
        self.recently_moved: dict[str, float] = {}
        self.migrations: dict[str, int] = {}
        self.failed_migrations = 0
        self.downtimes: list[float] = []
        self.max_queue = 0            # the longest waiting queue any instance had at a rebalancing tick
        self.queue_samples: list[int] = []
        self.computed_tokens = 0      # tokens every forward pass computed: recomputation shows up here
        self.now = 0.0

    # ---- events ---------------------------------------------------------------------------

    def _push(self, t: float, kind: str, data) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, data))

    def run(self, progress=None) -> dict:
        for k, tr in enumerate(self.trips):
            self._push(tr.arrival, "arrive", k)
        self._push(self.cfg.rebalance_interval, "tick", None)   # ticks also sample the queues
        done = 0
        while self._events:
            self.now, _, kind, data = heapq.heappop(self._events)
            if kind == "arrive":
                self._arrive(data)
            elif kind == "step":
                done += self._end_step(self.instances[data])
                if progress is not None and done:
                    progress.update(done)
                    done = 0
            elif kind == "precopied":
                self._precopied(data)
            elif kind == "land":
                self._land(data)
            elif kind == "tick":
                self._tick()
            elif kind == "manual":
                self._manual(*data)
        return self.summary()

    def migrate_at(self, t: float, request_id: str, dst: int) -> None:
        """Move a request to dst at time t, by hand (as POST /admin/migrate does); call before run()."""
        self._push(t, "manual", (request_id, dst))

    def _manual(self, request_id: str, dst: int) -> None:
        src = next((i.id for i in self.instances if request_id in i.sched.requests), None)
        if src is not None and src != dst and request_id not in self.moving:
            self._begin_move(Migration(request_id, src, dst, "manual"))

    def _unfinished(self) -> bool:
        return any(tr.end is None for tr in self.trips)

    # ---- dispatch and steps ------------------------------------------------------------------

    def _arrive(self, k: int) -> None:
        tr = self.trips[k]
        loads = [inst.report(self.cfg.block_size) for inst in self.instances]
        tr.instance = iid = self.policy(loads, rng=self.rng, prefix_blocks=None, prompt_len=tr.input_len)
        # Prompt content is irrelevant without prefix sharing (the traces carry none): all zeros.
        params = SamplingParams(max_tokens=tr.output_len, ignore_eos=True, temperature=0.0)
        req = Request(str(k), [0] * tr.input_len, params, tr.output_len, tr.arrival, None)
        inst = self.instances[iid]
        inst.sched.add(req)
        self._touch(inst)

    def _touch(self, inst: Instance) -> None:
        """The instance changed: invalidate its report, and start a step if it was idle."""
        inst.version += 1
        if inst.plan is None:
            self._start_step(inst)

    def _start_step(self, inst: Instance) -> None:
        plan = inst.sched.schedule()
        if plan.is_empty:
            inst.plan = None
            return
        inst.plan = plan
        self._push(self.now + step_seconds(self.cost, plan, inst.sched.requests), "step", inst.id)

    def _end_step(self, inst: Instance) -> int:
        plan, sched = inst.plan, inst.sched
        self.computed_tokens += plan.num_tokens
        sampled = {c.request_id: 0 for c in plan.chunks if c.sample and c.request_id in sched.requests}
        sched.update(plan, sampled)
        finished = 0
        for rid in sampled:
            req, tr = sched.requests[rid], self.trips[int(rid)]
            if tr.first_token is None:
                tr.first_token = self.now
            else:
                tr.max_gap = max(tr.max_gap, self.now - tr.last_token)
            tr.last_token = self.now
            if len(req.output_token_ids) >= req.max_tokens:   # ignore_eos: the trace's length ends it
                sched.finish(rid, RequestStatus.FINISHED_LENGTH)
                tr.end, tr.preemptions = self.now, req.num_preemptions
                finished += 1
                self._drop_move(rid)
        inst.plan = None
        self._stop_ready_moves(inst)
        inst.version += 1
        self._start_step(inst)
        return finished

    # ---- migration ------------------------------------------------------------------------

    def _tick(self) -> None:
        queues = [len(inst.sched.waiting) for inst in self.instances]
        self.max_queue = max(self.max_queue, max(queues))
        self.queue_samples.append(max(queues))
        if self.cfg.migration:
            self.recently_moved = {r: t for r, t in self.recently_moved.items()
                                   if self.now - t < self.cfg.move_cooldown}
            loads = [inst.report(self.cfg.block_size) for inst in self.instances]
            for m in plan_moves(loads, RebalanceSettings(), set(self.moving) | set(self.recently_moved)):
                self._begin_move(Migration(m.request_id, m.src, m.dst, m.reason))
        if self._unfinished():
            if not self._events and not self.moving and all(inst.plan is None for inst in self.instances):
                raise RuntimeError("cluster-sim stalled: unfinished requests but nothing can run")
            self._push(self.now + self.cfg.rebalance_interval, "tick", None)

    def _begin_move(self, mv: Migration) -> None:
        src, dst = self.instances[mv.src], self.instances[mv.dst]
        req = src.sched.requests.get(mv.request_id)
        if req is None:
            return
        # Pre-allocate on the destination what it holds now (a queued request holds nothing: it just goes).
        have = -(-req.num_computed_tokens // self.cfg.block_size)
        blocks = dst.pool.allocate(have) if have else []
        if blocks is None:
            self.failed_migrations += 1
            return
        mv.reserved = blocks
        self.moving[mv.request_id] = mv
        dst.version += 1
        if have:
            self._push(self.now + have * self.cfg.copy_seconds_per_block, "precopied", mv.request_id)
        else:
            mv.ready = True
            self._stop_if_idle(src)

    def _precopied(self, rid: str) -> None:
        mv = self.moving.get(rid)
        if mv is None:
            return
        mv.ready = True
        self._stop_if_idle(self.instances[mv.src])

    def _stop_if_idle(self, src: Instance) -> None:
        if src.plan is None:          # idle source: nothing is being written, stop it now
            self._stop_ready_moves(src)
            self._start_step(src)

    def _stop_ready_moves(self, src: Instance) -> None:
        """At a step boundary of the source: stop each pre-copied request, copy what it added meanwhile."""
        for rid, mv in list(self.moving.items()):
            if mv.src != src.id or not mv.ready or rid not in src.sched.requests:
                continue
            req = src.sched.requests[rid]
            computed = req.num_computed_tokens
            dst = self.instances[mv.dst]
            need = -(-computed // self.cfg.block_size)
            if len(mv.reserved) > need:       # it was preempted meanwhile: fewer blocks to carry
                dst.pool.free(mv.reserved[need:])
                mv.reserved = mv.reserved[:need]
            more = need - len(mv.reserved)
            extra = dst.pool.allocate(more) if more else []
            if extra is None:          # the destination filled up meanwhile: give up, it stays here
                self._drop_move(rid)
                self.failed_migrations += 1
                continue
            mv.reserved += extra
            src.sched.detach(rid)      # frees its source blocks (and zeroes its progress: restored on landing)
            req.num_computed_tokens = computed
            req.status = RequestStatus.WAITING
            src.version += 1
            downtime = self.cfg.stop_seconds + more * self.cfg.copy_seconds_per_block
            self.downtimes.append(downtime)
            self._push(self.now + downtime, "land", (mv, req))
            mv.ready = False           # in transit
            mv.src = -1

    def _land(self, data) -> None:
        mv, req = data
        dst = self.instances[mv.dst]
        req.block_ids = list(mv.reserved)
        req.block_keys = []
        dst.sched.add(req, front=True)     # it ran before: the head of its priority class, as import_request
        del self.moving[req.request_id]
        self.recently_moved[req.request_id] = self.now
        self.migrations[mv.reason] = self.migrations.get(mv.reason, 0) + 1
        tr = self.trips[int(req.request_id)]
        tr.instance = dst.id
        tr.moves += 1
        self._touch(dst)

    def _drop_move(self, rid: str) -> None:
        mv = self.moving.pop(rid, None)
        if mv is not None and mv.reserved:
            dst = self.instances[mv.dst]
            dst.pool.free(mv.reserved)
            self._touch(dst)

    # ---- results --------------------------------------------------------------------------

    def leaked_blocks(self) -> int:
        return sum(inst.pool.num_blocks - inst.pool.num_free for inst in self.instances)

    def summary(self) -> dict:
        done = [t for t in self.trips if t.end is not None]
        ttft = np.array([t.ttft for t in done])
        tpot = np.array([t.tpot for t in done if t.tpot is not None])
        good = [t for t in done if t.ttft <= SLO["ttft"] and (t.tpot is None or t.tpot <= SLO["tpot"])]
        span = max(t.end for t in done) - min(t.arrival for t in self.trips) if done else 0.0
        # Goodput over the window the trace offers load in (not the makespan, whose drain tail would make
        # a policy that finishes the last straggler late look worse on every request).
        offered = max(t.arrival for t in self.trips) - min(t.arrival for t in self.trips) if self.trips else 0.0
        out_tokens = sum(t.output_len for t in done)
        return {
            "instances": self.cfg.num_instances, "policy": self.cfg.policy, "migration": self.cfg.migration,
            "requests": len(self.trips), "finished": len(done), "clipped": self.clipped,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
            "preemptions": sum(inst.sched.num_preemptions for inst in self.instances),
            "migrations": sum(self.migrations.values()), "migrations_by_reason": dict(self.migrations),
            "failed_migrations": self.failed_migrations, "moved_requests": sum(1 for t in done if t.moves),
            "longest_pause_s": max((t.max_gap for t in done), default=0.0),
            "downtime_p50_ms": _pct(np.array(self.downtimes) * 1e3, 50),
            "slo_attainment": len(good) / len(self.trips) if self.trips else 0.0,
            "goodput_rps": len(good) / offered if offered else 0.0,
            "output_tok_s": out_tokens / span if span else 0.0,
            "max_queue": self.max_queue,
            "mean_max_queue": float(np.mean(self.queue_samples)) if self.queue_samples else 0.0,
            "makespan_s": span, "leaked_blocks": self.leaked_blocks(), "computed_tokens": self.computed_tokens,
        }


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None


# ---- workloads and the sweep ---------------------------------------------------------------


def cluster_trace(rows: list[tuple[float, int, int]], num_instances: int, requests_per_instance: int,
                  rate_per_instance: float) -> list[tuple[float, int, int]]:
    """requests_per_instance x N rows of a trace, time-scaled so the cluster receives rate_per_instance x N
    requests a second: the load per instance stays the same as N grows. The first rows in trace order are
    taken (its bursts intact); a trace shorter than that is replayed back to back, each copy after the last."""
    m = requests_per_instance * num_instances
    length = rows[-1][0] + (rows[-1][0] / max(1, len(rows) - 1))   # a copy lasts its span plus one mean gap
    picked = [(t + (k // len(rows)) * length, i, o) for k, (t, i, o) in
              ((k, rows[k % len(rows)]) for k in range(m))]
    native = (len(picked) - 1) / (picked[-1][0] - picked[0][0]) if len(picked) > 1 and picked[-1][0] > 0 else 1.0
    scale = rate_per_instance * num_instances / native
    t0 = picked[0][0]
    return [((t - t0) / scale, i, o) for t, i, o in picked]


def run_sweep(trace: str, instance_counts: list[int], policies: list[str], requests_per_instance: int,
              rate_per_instance: float, step_cost: StepCost | None = None, seed: int = 0,
              cfg_overrides: dict | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    rows = read_trace(find_trace(trace))
    cost = step_cost or default_step_cost()
    runs = []
    total = sum(requests_per_instance * n for n in instance_counts) * len(policies) * 2
    bar = tqdm(total=total, desc=f"cluster-sim {trace}", unit="req", disable=not progress, mininterval=2.0)
    started = time.perf_counter()
    for n in instance_counts:
        reqs = cluster_trace(rows, n, requests_per_instance, rate_per_instance)
        for policy in policies:
            for migration in (False, True):
                cfg = SimConfig(num_instances=n, policy=policy, migration=migration, seed=seed,
                                **(cfg_overrides or {}))
                bar.set_postfix_str(f"N={n} {policy} {'mig' if migration else 'no-mig'}")
                sim = ClusterSim(cfg, reqs, cost)
                runs.append(sim.run(progress=bar))
    bar.close()
    return {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "trace": trace, "trace_rows": len(rows), "requests_per_instance": requests_per_instance,
        "rate_per_instance_rps": rate_per_instance, "slo": {"ttft_s": SLO["ttft"], "tpot_s": SLO["tpot"]},
        "config": {k: v for k, v in asdict(SimConfig(num_instances=0, **(cfg_overrides or {}))).items()
                   if k not in ("num_instances", "policy", "migration")},
        "step_cost": {"sizes": cost.sizes, "seconds": cost.seconds, "per_chunk": cost.per_chunk,
                      "decode_sizes": cost.decode_sizes, "decode_seconds": cost.decode_seconds,
                      "per_context_token": cost.per_context_token},
        "runs": runs,
    }


def markdown_table(result: dict) -> str:
    head = ("| N | policy | migration | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | preempt. | migr. | "
            "SLO met | goodput (req/s) |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["runs"]:
        lines.append(f"| {r['instances']} | {r['policy']} | {'on' if r['migration'] else 'off'} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                     f"{r['tpot_p50_s'] * 1e3:.0f} / {r['tpot_p99_s'] * 1e3:.0f} | {r['preemptions']} | "
                     f"{r['migrations']} | {r['slo_attainment'] * 100:.1f}% | {r['goodput_rps']:.2f} |")
    return head + "\n".join(lines) + "\n"


def plot_sweep(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("ttft_p99_s", "P99 TTFT (s)", "log"), ("tpot_p99_s", "P99 TPOT (s)", "linear"),
               ("slo_attainment", "share of requests within the SLO", "linear"),
               ("preemptions", "preemptions", "symlog")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(18, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    policies = sorted({r["policy"] for r in result["runs"]}, key=POLICIES.index)
    counts = sorted({r["instances"] for r in result["runs"]})
    for ax, (key, label, scale) in zip(axes, metrics):
        for policy, color in zip(policies, colors):
            for migration, style in ((False, "o--"), (True, "s-")):
                runs = sorted((r for r in result["runs"] if r["policy"] == policy and r["migration"] == migration),
                              key=lambda r: r["instances"])
                ys = [r[key] for r in runs]
                ax.plot([r["instances"] for r in runs], ys, style, color=color,
                        label=f"{policy}{' + migration' if migration else ''}", alpha=0.9 if migration else 0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_yscale(scale)
        if scale == "symlog":
            ax.set_ylim(bottom=0)
        ax.set_xlabel("instances")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    slo = result["slo"]
    fig.suptitle(f"cluster-sim, {result['trace']}: {result['rate_per_instance_rps']} req/s per instance, "
                 f"{result['requests_per_instance']} requests per instance; SLO TTFT<={slo['ttft_s']} s, "
                 f"TPOT<={slo['tpot_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_doc(doc: str, trace: str, table: str) -> bool:
    """Replace the table between <!-- cluster-sim:TRACE --> and <!-- /cluster-sim:TRACE --> in doc."""
    if not os.path.isfile(doc):
        return False
    text = open(doc).read()
    start, end = f"<!-- cluster-sim:{trace} -->", f"<!-- /cluster-sim:{trace} -->"
    if start not in text or end not in text:
        return False
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    with open(doc, "w") as f:
        f.write(before + start + "\n" + table + end + after)
    return True


def cmd_cluster_sim(args) -> None:
    cost = load_step_cost(args.step_cost) if args.step_cost else None
    if args.validate:
        result = validate_against_engine(step_cost=cost)
        print(json.dumps(result, indent=2))
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "cluster-sim-validation.json"), "w") as f:
            json.dump(result, f, indent=2)
        return
    counts = [int(x) for x in args.instances.split(",")]
    policies = args.policies.split(",")
    for trace in args.trace.split(","):
        rate = args.rate_per_instance or DEFAULT_RATES.get(trace, 1.0)
        result = run_sweep(trace, counts, policies, args.requests_per_instance, rate, cost, args.seed)
        result["command"] = (f"kvloom bench cluster-sim --trace {trace} --instances {args.instances} "
                             f"--policies {args.policies} --requests-per-instance {args.requests_per_instance} "
                             f"--rate-per-instance {rate} --seed {args.seed}"
                             + (f" --step-cost {args.step_cost}" if args.step_cost else ""))
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, f"cluster-sim-{trace}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)
        plot_sweep(result, stem + ".png")
        table = markdown_table(result)
        print(table)
        if args.doc and update_doc(args.doc, trace, table):
            print(f"table written into {args.doc}")
        print(f"wrote {stem}.json and {stem}.png")



# ---- how close is it: one real engine against one simulated instance ---------------------------


def validate_against_engine(trace: str = "burstgpt", num_requests: int = 24, rate: float = 2.0,
                            max_input: int = 512, max_output: int = 64, step_cost: StepCost | None = None) -> dict:
    """Replay the same requests (the trace's first rows, clipped, at `rate` req/s) through a real Engine
    (default model, w8a8, 32 / 256, no prefix caching: the simulator's settings) on the wall clock, and
    through ClusterSim with one instance. Compares each real step's time with the step-cost model's price
    of the same plan, and the latency percentiles. The real side depends on how busy the machine is."""
    from kvloom.config import EngineConfig
    from kvloom.engine.engine import Engine

    cost = step_cost or default_step_cost()
    rows = read_trace(find_trace(trace))[:num_requests]
    reqs = [(k / rate, min(i, max_input), min(o, max_output)) for k, (_, i, o) in enumerate(rows)]
    cfg = SimConfig(num_instances=1, policy="round-robin")
    engine = Engine(EngineConfig(quantization="w8a8", max_num_seqs=cfg.max_num_seqs,
                                 max_num_batched_tokens=cfg.max_num_batched_tokens, enable_prefix_caching=False))
    cfg.num_blocks = engine.num_blocks
    plans = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plans.append(schedule())
        return plans[-1]
    engine.scheduler.schedule = recording_schedule
    vocab = engine.model.shape.vocab_size
    trips = [Trip(t, i, o) for t, i, o in reqs]
    step_pairs = []      # (real seconds, modelled seconds) per step
    t0, nxt, done = time.perf_counter(), 0, 0
    while done < len(trips):
        now = time.perf_counter() - t0
        while nxt < len(trips) and trips[nxt].arrival <= now:
            tr = trips[nxt]
            engine.add_request([(7 * nxt + j) % vocab for j in range(tr.input_len)],
                               SamplingParams(max_tokens=tr.output_len, ignore_eos=True, temperature=0.0),
                               request_id=str(nxt))
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, trips[nxt].arrival - now))
            continue
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        if plans and not plans[-1].is_empty:
            step_pairs.append((end - start, step_seconds(cost, plans[-1], engine.scheduler.requests)))
        for o in outs:
            tr = trips[int(o.request_id)]
            if tr.first_token is None and o.token_ids:
                tr.first_token = end - t0
            if o.finished:
                tr.end = end - t0
                done += 1
    real = np.array([p[0] for p in step_pairs])
    model = np.array([p[1] for p in step_pairs])
    sim = ClusterSim(cfg, reqs, cost)
    s = sim.run()
    # The same, with every step-cost term scaled by the real/model ratio of this run: does the simulator get
    # the latencies right once it knows how slow this machine's steps were just now (queueing, SplitFuse)?
    k = float(real.sum() / model.sum())
    scaled = StepCost(cost.sizes, [x * k for x in cost.seconds], cost.per_chunk * k, cost.decode_sizes,
                      [x * k for x in cost.decode_seconds], cost.per_context_token * k)
    sim_scaled = ClusterSim(cfg, reqs, scaled)
    sim_scaled.run()

    def lat(ts: list[Trip]) -> dict:
        ttft = np.array([t.ttft for t in ts])
        tpot = np.array([t.tpot for t in ts if t.tpot is not None])
        return {"ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "tpot_p50_s": _pct(tpot, 50),
                "tpot_p99_s": _pct(tpot, 99), "makespan_s": max(t.end for t in ts)}
    return {"trace": trace, "requests": len(reqs), "rate_rps": rate, "max_input": max_input, "max_output": max_output,
            "loadavg_after": os.getloadavg(), "steps": len(step_pairs),
            "step_real_over_model": {"median": float(np.median(real / model)),
                                     "p10": float(np.percentile(real / model, 10)),
                                     "p90": float(np.percentile(real / model, 90)),
                                     "sum": float(real.sum() / model.sum())},
            "real": lat(trips), "simulated": lat(sim.trips), "simulated_scaled": lat(sim_scaled.trips),
            "sim_preemptions": s["preemptions"],
            "real_preemptions": engine.scheduler.num_preemptions}
