"""Requests that move: export a request from one engine part-way, import it into another, finish it there.

The moved request must produce exactly the tokens and text it produces when it never moves, its
streamed deltas must join with no gap and no repeat, and both engines' pools must end with every
block free. With KV the blocks travel; without, the destination recomputes them (fault recovery).
"""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from conftest import random_prompts
from kvloom import SamplingParams
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.engine.snapshot import RequestSnapshot
from kvloom.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)

_engines: dict[tuple, tuple[Engine, Engine]] = {}


def engine_pair(model_dir: str, **settings) -> tuple[Engine, Engine]:
    """Two engines with the same settings (built once per setting for the module)."""
    key = (model_dir, tuple(sorted(settings.items())))
    if key not in _engines:
        cfg = EngineConfig(model=model_dir, kv_cache_memory=4 << 20, **settings)
        _engines[key] = (Engine(cfg), Engine(cfg))
    return _engines[key]


def drain(engine: Engine, results: dict) -> None:
    while engine.has_unfinished():
        collect(engine.step(), results)


def collect(outputs, results: dict) -> None:
    for out in outputs:
        r = results.setdefault(out.request_id, {"text": "", "streamed": "", "tokens": []})
        r["streamed"] += out.delta_text
        if out.finished:
            r["text"], r["tokens"] = out.text, out.token_ids


def run_alone(engine: Engine, prompt, params, rid: str) -> dict:
    results: dict = {}
    engine.add_request(prompt, params, request_id=rid)
    drain(engine, results)
    return results


def run_moved(src: Engine, dst: Engine, prompt, params, rid: str, after_tokens: int, with_kv: bool = True,
              through=None) -> dict:
    """Run the request in src until it has `after_tokens` output tokens (0: still waiting), move it, finish it
    in dst."""
    results: dict = {}
    src.add_request(prompt, params, request_id=rid)
    while len(src.scheduler.requests[rid].output_token_ids) < after_tokens:
        collect(src.step(), results)
    assert src.has_unfinished(), "the request finished before it could move"
    snap = src.export_request(rid, with_kv=with_kv)
    assert (snap.kv is not None) == (with_kv and after_tokens > 0)   # a waiting request has no KV yet
    if through is not None:
        snap = through(snap)
    dst.import_request(snap)
    drain(dst, results)
    return results


def assert_same(moved: dict, alone: dict) -> None:
    assert set(moved) == set(alone)
    for rid, r in alone.items():
        assert moved[rid]["tokens"] == r["tokens"], rid
        assert moved[rid]["text"] == r["text"], rid
        assert moved[rid]["streamed"] == r["streamed"] == r["text"], rid   # no gap, no repeat


def assert_all_blocks_free(*engines: Engine) -> None:
    for e in engines:
        assert not e.has_unfinished()
        assert e.pool.num_free == e.pool.num_blocks, "a KV block leaked"


CASES = {
    "greedy": ({}, GREEDY),
    "seeded": ({}, SEEDED),
    "w8a8-greedy": ({"quantization": "w8a8"}, GREEDY),
    "w8a8-seeded": ({"quantization": "w8a8"}, SEEDED),
    "int8-kv-greedy": ({"kv_cache_dtype": "int8"}, GREEDY),
    "int8-kv-seeded": ({"kv_cache_dtype": "int8"}, SEEDED),
    "float16-kv-greedy": ({"kv_cache_dtype": "float16"}, GREEDY),
    "speculation-greedy": ({"speculative": "lookahead"}, GREEDY),
}


@pytest.mark.parametrize("with_kv", [True, False], ids=["kv", "recompute"])
@pytest.mark.parametrize("case", list(CASES))
def test_moved_request_gives_the_same_tokens(tiny_model_dir, case, with_kv):
    settings, params = CASES[case]
    a, b = engine_pair(tiny_model_dir("llama"), **settings)
    # A repetitive prompt, so lookahead has drafts to verify (and the move carries a trie's worth of state).
    prompt = (random_prompts(1, [9], seed=5)[0] * 4)[:35]
    alone = run_alone(a, prompt, params, "r")
    for after in (0, 3, 9):   # still waiting; mid-block; across a block boundary (block_size 16, 35-token prompt)
        moved = run_moved(a, b, prompt, params, "r", after, with_kv)
        assert_same(moved, alone)
    assert_all_blocks_free(a, b)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_family_of_three_moves_together(tiny_model_dir, params):
    a, b = engine_pair(tiny_model_dir("llama"))
    prompt = random_prompts(1, [40], seed=6)[0]
    family = SamplingParams(**{**_fields(params), "n": 3, "temperature": max(params.temperature, 0.7),
                               "seed": 77})
    alone = run_alone(a, prompt, family, "fam")
    assert set(alone) == {"fam", "fam#1", "fam#2"}
    for after in (0, 4):   # before the forks (pending), and after them (sharing the prompt's blocks)
        assert_same(run_moved(a, b, prompt, family, "fam", after), alone)
        assert_same(run_moved(a, b, prompt, family, "fam", after, with_kv=False), alone)
    assert_all_blocks_free(a, b)


def test_forks_share_their_blocks_after_the_move(tiny_model_dir):
    a, b = engine_pair(tiny_model_dir("llama"))
    prompt = random_prompts(1, [40], seed=7)[0]
    a.add_request(prompt, SamplingParams(n=3, temperature=0.9, seed=3, max_tokens=20, ignore_eos=True),
                  request_id="f")
    for _ in range(3):
        a.step()
    snap = a.export_request("f")
    assert snap.kv.num_blocks < sum(len(s.block_table) for s in snap.samples)   # deduplicated
    used_before = b.pool.num_used
    b.import_request(snap)
    assert b.pool.num_used - used_before == snap.kv.num_blocks
    drain(b, {})
    assert_all_blocks_free(a, b)


def test_request_moved_part_way_through_its_prompt(tiny_model_dir):
    a, b = engine_pair(tiny_model_dir("llama"), max_num_batched_tokens=16, enable_prefix_caching=False)
    prompt = random_prompts(1, [70], seed=8)[0]
    for params in (GREEDY, SEEDED):
        alone = run_alone(a, prompt, params, "p")
        for steps in (1, 2):   # 16 and 32 of the 70 prompt tokens computed
            results: dict = {}
            a.add_request(prompt, params, request_id="p")
            for _ in range(steps):
                collect(a.step(), results)
            snap = a.export_request("p")
            assert snap.samples[0].num_computed_tokens == 16 * steps and not snap.samples[0].output_token_ids
            b.import_request(snap)
            drain(b, results)
            assert_same(results, alone)
    assert_all_blocks_free(a, b)


def test_moved_request_with_prefix_cached_blocks(tiny_model_dir):
    a, b = engine_pair(tiny_model_dir("llama"))
    shared = random_prompts(1, [48], seed=9)[0]
    prompt = shared + [11, 12, 13, 14, 15]
    run_alone(a, shared + [20, 21], GREEDY, "warm")        # leaves the shared prefix cached in a
    alone = run_alone(b, prompt, GREEDY, "x")
    results: dict = {}
    a.add_request(prompt, GREEDY, request_id="x")
    collect(a.step(), results)
    snap = a.export_request("x")
    assert snap.samples[0].num_cached_tokens == 48
    b.import_request(snap)
    drain(b, results)
    assert_same(results, alone)
    assert_all_blocks_free(a, b)


def test_snapshot_crosses_a_process_boundary(tiny_model_dir, tmp_path):
    """Pickled and in the pickle-free form, read back in another interpreter and imported there."""
    a, b = engine_pair(tiny_model_dir("llama"), kv_cache_dtype="int8")
    prompt = random_prompts(1, [30], seed=10)[0]
    alone = run_alone(a, prompt, SEEDED, "s")
    for encode in (pickle.dumps, RequestSnapshot.to_bytes):
        results: dict = {}
        a.add_request(prompt, SEEDED, request_id="s")
        for _ in range(5):
            collect(a.step(), results)
        data = encode(a.export_request("s"))
        path = tmp_path / "snap.bin"
        path.write_bytes(data)
        # Another process reads the snapshot and writes it back in the same form.
        out = tmp_path / "back.bin"
        decode = "pickle.loads" if encode is pickle.dumps else "RequestSnapshot.from_bytes"
        reencode = "pickle.dumps" if encode is pickle.dumps else "RequestSnapshot.to_bytes"
        code = (f"import pickle, pathlib; from kvloom.engine.snapshot import RequestSnapshot; "
                f"s = {decode}(pathlib.Path({str(path)!r}).read_bytes()); "
                f"assert s.kv is not None and s.samples[0].generator_state is not None; "
                f"pathlib.Path({str(out)!r}).write_bytes({reencode}(s))")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        back = out.read_bytes()
        snap = pickle.loads(back) if encode is pickle.dumps else RequestSnapshot.from_bytes(back)
        b.import_request(snap)
        drain(b, results)
        assert_same(results, alone)
    assert_all_blocks_free(a, b)


def test_import_refuses_what_does_not_fit_and_changes_nothing(tiny_model_dir):
    a, _ = engine_pair(tiny_model_dir("llama"))
    _, c = engine_pair(tiny_model_dir("llama"), kv_cache_dtype="int8")
    a.add_request(random_prompts(1, [20], seed=11)[0], GREEDY, request_id="m")
    a.step()
    snap = a.export_request("m")
    with pytest.raises(InvalidRequestError, match="KV"):
        c.import_request(snap)                         # another KV layout
    assert not c.has_unfinished() and c.pool.num_used == 0
    c.import_request(snap.without_kv())                # recomputed there instead
    with pytest.raises(InvalidRequestError, match="already in use"):
        c.import_request(snap.without_kv())
    drain(c, {})
    with pytest.raises(InvalidRequestError):
        a.export_request("m")                          # it left a
    assert_all_blocks_free(a, c)


def _fields(p: SamplingParams) -> dict:
    import dataclasses
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}


def run_resumed(src: Engine, dst: Engine, prompt, params, rid: str, after_tokens: int) -> dict:
    """Run in src until sample 0 has `after_tokens` tokens, then lose src's state (abort: as if it died) and
    resume in dst from what was streamed alone: the tokens and logprobs of the last outputs seen."""
    results: dict = {}
    last: dict[int, object] = {}
    src.add_request(prompt, params, request_id=rid)
    while len(src.scheduler.requests[rid].output_token_ids) < after_tokens:
        outs = src.step()
        collect(outs, results)
        last.update({o.index: o for o in outs})
    src.abort_request(rid)
    outputs = {i: (o.token_ids, o.logprobs) for i, o in last.items() if not o.finished}
    outputs.update({k: ([], None) for k in range(params.n) if k not in last})
    dst.resume_request(rid, prompt, params, outputs)
    drain(dst, results)
    return results


@pytest.mark.parametrize("case", ["greedy", "seeded", "speculation-greedy"])
def test_request_resumed_from_its_streamed_tokens_alone(tiny_model_dir, case):
    settings, params = CASES[case]
    a, b = engine_pair(tiny_model_dir("llama"), **settings)
    for i, prompt in enumerate(random_prompts(2, [13, 37], seed=11)):
        alone = run_alone(a, prompt, params, f"r{i}")
        for after in (1, 9):
            assert_same(run_resumed(a, b, prompt, params, f"r{i}", after), alone)
    if settings:       # sampled drafts depend on the speculator's state, which a resume does not have
        return
    family = SamplingParams(**{**_fields(SEEDED), "n": 3, "seed": 5})
    prompt = random_prompts(1, [21], seed=3)[0]
    alone = run_alone(a, prompt, family, "fam")
    assert_same(run_resumed(a, b, prompt, family, "fam", 5), alone)
    with pytest.raises(InvalidRequestError, match="seed"):
        b.resume_request("x", prompt, SamplingParams(temperature=0.7), {0: ([], None)})
    assert_all_blocks_free(a, b)
