"""engine/openmp_pool.py: the thread that built the engine gives its OpenMP workers back, and the engine's
thread keeps its own. Run in a child process: the call changes the calling thread for good."""
import json
import os
import subprocess
import sys
import textwrap


CHILD = textwrap.dedent("""
    import json, os, threading
    import torch
    from kvloom.engine.openmp_pool import leave_compute_to_engine_thread

    torch.set_num_threads(2)
    big = torch.randn(4_000_000)
    def work():   # ATen's elementwise loop over millions of values: a parallel region on each thread
        return big * 1.5 + 0.25
    reference = work()              # the main thread's pool: one worker
    seen = {}
    ready, done = threading.Event(), threading.Event()
    def engine_thread():
        seen["before"] = work()
        ready.set()
        done.wait()
        seen["after"] = work()
        seen["engine_threads"] = torch.get_num_threads()
    t = threading.Thread(target=engine_thread)
    t.start()
    ready.wait()
    count = lambda: len(os.listdir("/proc/self/task"))
    with_both_pools = count()
    released = leave_compute_to_engine_thread()
    after_release = count()
    main_threads = torch.get_num_threads()
    main_result = work()            # one thread now: no pool comes back
    after_main_work = count()
    done.set()
    t.join()
    print(json.dumps({"released": released, "with_both_pools": with_both_pools, "after_release": after_release,
                      "after_main_work": after_main_work, "main_threads": main_threads,
                      "engine_threads": seen["engine_threads"],
                      "same": all(torch.equal(reference, r) for r in (main_result, seen["before"], seen["after"]))}))
""")


def run_child(script: str) -> dict:
    """The script's result: the JSON on its last line (a fresh process, two OpenMP threads: libgomp makes the
    worker even on one CPU, so this runs everywhere)."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_building_thread_releases_its_workers_and_the_engine_thread_keeps_its_own():
    r = run_child(CHILD)
    assert r["released"] is True
    assert r["after_release"] == r["with_both_pools"] - 1      # the main thread's one worker is gone
    assert r["after_main_work"] == r["after_release"]          # and its later work builds no new pool
    assert r["main_threads"] == 1
    assert r["engine_threads"] == 2
    assert r["same"]                                            # the same values on 1 and 2 threads


RELEASE_ONLY = textwrap.dedent("""
    import json, os
    import torch
    from kvloom.engine.openmp_pool import release_openmp_workers

    torch.set_num_threads(2)
    big = torch.randn(4_000_000)
    count = lambda: len(os.listdir("/proc/self/task"))
    first = big * 1.5 + 0.25
    with_pool = count()
    released = release_openmp_workers()
    after_release = count()
    again = big * 1.5 + 0.25     # a model loader's next load: its full thread count, a new pool
    print(json.dumps({"released": released, "with_pool": with_pool, "after_release": after_release,
                      "after_work": count(), "threads": torch.get_num_threads(), "same": torch.equal(first, again)}))
""")


def test_a_loader_thread_releases_its_workers_and_keeps_its_thread_count():
    r = run_child(RELEASE_ONLY)
    assert r["released"] is True
    assert r["after_release"] == r["with_pool"] - 1
    assert r["after_work"] == r["with_pool"]
    assert r["threads"] == 2
    assert r["same"]


def test_server_info_reports_the_engine_threads_not_the_event_loops(tiny_model_dir):
    import torch

    from kvloom.config import EngineConfig
    from kvloom.engine.engine import Engine
    from kvloom.system_info import engine_description

    engine = Engine(EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20))
    assert engine.compute_threads == torch.get_num_threads()
    engine.compute_threads = 7      # what the engine thread runs on, whatever this thread's own count
    assert engine_description(engine)["torch_threads"] == 7
