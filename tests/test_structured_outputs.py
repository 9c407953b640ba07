"""Structured outputs: grammar masks on the sampling path, exactness beside unconstrained rows, chunking,
preemption, speculation, n > 1, moves, grammars compiled off the engine thread, and bad input."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from conftest import random_prompts
from kvloom import LLM, SamplingParams
from kvloom.config import EngineConfig
from kvloom.engine.engine import Engine
from kvloom.errors import InvalidRequestError
from kvloom.speculation.step_cost import StepCost
from kvloom.structured import StructuredOutputs
from kvloom.structured import compiler as compiler_mod

REGEX = r"(ab|cd|e f){2,6}[0-9]{1,3}"
CHOICES = ["alpha", "beta gamma", "delta\"quote"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9},
                                           "kind": {"enum": ["x", "y"]}},
          "required": ["ok", "n", "kind"], "additionalProperties": False}
LOOSE = r"[a-m ]{0,60}"           # refuses many tokens the model likes: drafts get refused too


def _params(so, **kw):
    base = dict(temperature=0.0, max_tokens=40)
    base.update(kw)
    return SamplingParams(structured_outputs=so, **base)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), kv_cache_memory=4 << 20)


def test_regex_choice_json_hold_on_every_seeded_sample(llm):
    prompts = random_prompts(3, seed=1)
    for so, check in (({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
                      ({"choice": CHOICES}, lambda t: t in CHOICES),
                      ({"json": SCHEMA}, lambda t: set(json.loads(t)) == {"ok", "n", "kind"})):
        results = llm.generate(prompts, _params(so, temperature=1.0, seed=7, n=4, max_tokens=60))
        for r in results:
            for o in r.outputs:
                assert o.finish_reason == "stop" and check(o.text), (so, o.text)
        # seeded: the same again
        again = llm.generate(prompts, _params(so, temperature=1.0, seed=7, n=4, max_tokens=60))
        assert [[o.token_ids for o in r.outputs] for r in again] == [[o.token_ids for o in r.outputs] for r in results]
    assert llm.engine.pool.num_free == llm.engine.num_blocks


def test_n_samples_each_follow_their_own_grammar_state(llm):
    r = llm.generate(random_prompts(1, seed=2), _params({"choice": CHOICES}, temperature=1.5, seed=3, n=8))[0]
    assert all(o.text in CHOICES for o in r.outputs)
    assert len({o.text for o in r.outputs}) > 1     # they diverge: each its own matcher


def test_json_object_and_typed_spec(llm):
    r = llm.generate(random_prompts(2, seed=4), SamplingParams(
        temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputs(json_object=True)))
    for x in r:
        if x.finish_reason == "stop":
            assert isinstance(json.loads(x.text), dict)
        else:
            assert x.text.startswith("{")


def test_unconstrained_rows_stay_token_exact_beside_constrained_ones(llm):
    prompts = random_prompts(8, seed=5)
    plain = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
             SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)]
    alone = [r.token_ids for r in llm.generate(prompts, [plain[i % 2] for i in range(8)])]
    mixed_params = []
    for i in range(8):
        mixed_params += [plain[i % 2], _params({"regex": REGEX} if i % 2 else {"json": SCHEMA}, temperature=1.0,
                                               seed=i)]
    mixed = llm.generate([p for p in prompts for _ in (0, 1)], mixed_params)
    assert [r.token_ids for r in mixed[::2]] == alone


def test_constrained_greedy_is_identical_alone_batched_chunked_preempted_and_speculated(tiny_model_dir, llm):
    model = tiny_model_dir("llama")
    prompts = [p + p[:8] + p for p in random_prompts(6, [20] * 6, seed=6)]
    specs = [{"regex": LOOSE}, {"regex": REGEX}, {"json": SCHEMA}, {"regex": r"(?s:.{0,50})"}]
    params = [_params(specs[i % len(specs)], max_tokens=30) for i in range(len(prompts))]
    alone = [llm.generate([p], [q])[0].token_ids for p, q in zip(prompts, params)]
    assert [r.token_ids for r in llm.generate(prompts, params)] == alone
    chunked = LLM(model, kv_cache_memory=4 << 20, max_num_batched_tokens=8)
    assert [r.token_ids for r in chunked.generate(prompts, params)] == alone
    small = LLM(model, kv_cache_memory=12 * 16 * 512, max_num_batched_tokens=32)     # 12 blocks: preemption
    assert [r.token_ids for r in small.generate(prompts, params)] == alone
    assert small.engine.scheduler.num_preemptions > 0
    spec = LLM(model, kv_cache_memory=4 << 20, speculative="lookahead")
    spec.engine.speculator.step_cost = StepCost([1, 64], [1.0, 1.0])   # always worth drafting
    spec.engine.speculator.guard.allows = lambda rows: True              # whatever the step times say
    assert [r.token_ids for r in spec.generate(prompts, params)] == alone
    assert spec.engine.speculator.stats()["proposed"] > 0
    for x in (chunked, small, spec):
        assert x.engine.pool.num_free == x.engine.num_blocks


def test_draft_tree_masks_follow_each_branch(llm):
    from kvloom.structured.matcher import RequestMatcher, mask_draft_tree
    hf = llm.tokenizer.hf
    a, b, c, d, x = (hf.convert_tokens_to_ids(ch) for ch in "abcdx")
    proto = llm.engine.grammars.submit(StructuredOutputs(regex="a(b|c)d")).result()
    V = llm.engine.grammars.vocab_size
    m = RequestMatcher(proto, V)
    # tree: a -> {b -> d, x (refused) -> d}, and a root sibling c (refused at the root)
    tokens, parents = [a, b, d, x, d, c], [-1, 0, 1, 0, 3, -1]
    rows = mask_draft_tree(torch.zeros(7, V), tokens, parents, m)
    allowed = [set(torch.nonzero(r == 0).flatten().tolist()) for r in rows]
    assert allowed[0] == {a}                 # root: only a
    assert {b, c} <= allowed[1] and d not in allowed[1] and x not in allowed[1]
    assert allowed[2] == {d}                 # after a b: d
    assert allowed[3] <= llm.tokenizer.eos_token_ids | {-1} and allowed[3]   # after a b d: only EOS
    assert len(allowed[4]) == V and len(allowed[6]) == V   # refused drafts' rows: never read, left alone
    assert m.consumed == 0 and not m.m.is_error()
    m.sync([a, c])                           # the matcher was left where it began
    assert m.error is None


def test_a_grammar_failing_mid_output_ends_the_request_never_unconstrained(llm):
    # The regex validates and compiles; llguidance's lexer gives up at the first token (LexerTooComplex).
    # Going on unconstrained would hand back text that breaks the client's constraint.
    bad = SamplingParams(temperature=0.0, max_tokens=20, structured_outputs={"regex": "(a|aa){1000}{1000}"})
    good = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs={"regex": "[a-z]{8}"})
    failed, ok = llm.generate(["hello", "hello"], [bad, good])
    assert failed.outputs[0].finish_reason == "error" and "too many expressions" in failed.outputs[0].error
    assert "\n" not in failed.outputs[0].error
    assert ok.outputs[0].finish_reason in ("stop", "length") and re.fullmatch("[a-z]{8}", ok.outputs[0].text)
    assert not llm.engine.has_unfinished() and llm.engine.pool.num_used == 0


def test_bad_constraints_are_typed_errors_naming_the_field(llm):
    bad = [({"json": {"type": "nope"}}, "structured_outputs.json"),
           ({"json": "{not json"}, "structured_outputs.json"),
           ({"regex": "a(b"}, "structured_outputs.regex"),
           ({"grammar": "start: foo"}, "structured_outputs.grammar"),
           ({"choice": []}, "structured_outputs.choice"),
           ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
           ({"nonsense": 1}, "structured_outputs")]
    for so, field in bad:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate([[5, 6, 7]], SamplingParams(structured_outputs=so))
        assert e.value.field == field, (so, e.value)
    assert not llm.engine.has_unfinished()


def test_grammars_compile_off_the_engine_thread_and_are_cached(tiny_model_dir, monkeypatch):
    engine = Engine(EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20))
    release = threading.Event()
    real = compiler_mod.GrammarCompiler._compile

    def slow(self, spec):
        release.wait(30)
        return real(self, spec)
    monkeypatch.setattr(compiler_mod.GrammarCompiler, "_compile", slow)
    engine.add_request([5, 6, 7], _params({"regex": "zz+"}, max_tokens=5), request_id="c")
    engine.add_request([5, 6, 8], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), request_id="u")
    finished = {}
    t0 = time.time()
    while "u" not in finished and time.time() - t0 < 60:
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    assert "u" in finished and "c" not in finished    # the plain request ran while the grammar compiled
    engine.add_request([5, 6, 7], _params({"regex": "yy+"}, max_tokens=5), request_id="gone")
    assert engine.abort_request("gone")                # a request waiting for its grammar can be aborted
    release.set()
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    assert re.fullmatch("zz+", finished["c"].text) and "gone" not in finished
    hits = engine.grammars.hits
    engine.add_request([5, 6, 9], _params({"regex": "zz+"}, max_tokens=5), request_id="c2")
    assert engine.grammars.hits == hits + 1
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_free == engine.num_blocks


def test_constrained_request_moves_with_its_grammar_state(tiny_model_dir):
    cfg = EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20)
    src, dst, ref = Engine(cfg), Engine(cfg), Engine(cfg)
    params = _params({"regex": REGEX}, temperature=1.0, seed=5, max_tokens=30)
    prompt = random_prompts(1, seed=9)[0]
    ref.add_request(prompt, params, request_id="r")
    want = None
    while ref.has_unfinished():
        for o in ref.step():
            if o.finished:
                want = o.token_ids
    for with_kv in (True, False):
        src.add_request(prompt, params, request_id="r")
        while src.has_unfinished() and ("r" not in src.scheduler.requests
                                         or len(src.scheduler.requests["r"].output_token_ids) < 3):
            src.step()
        snap = src.export_request("r", with_kv=with_kv)
        from kvloom.engine.snapshot import RequestSnapshot
        snap = RequestSnapshot.from_bytes(snap.to_bytes())
        dst.import_request(snap)
        got = None
        while dst.has_unfinished():
            for o in dst.step():
                if o.finished:
                    got = o.token_ids
        assert got == want


# ---- the default model through the official client's parse() ----------------------------------------------

def test_openai_parse_with_pydantic_models_on_the_default_model():
    import enum
    from typing import Annotated

    import openai
    from pydantic import BaseModel, Field
    from server_harness import ServerThread, tiny_engine

    class Color(str, enum.Enum):
        red = "red"
        green = "green"

    class Address(BaseModel):
        city: str = Field(max_length=20)
        zip_code: str = Field(pattern=r"^[0-9]{5}$")

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)
        height_m: float = Field(ge=0.5, le=2.5)
        favourite: Color
        nickname: str | None = Field(default=None, max_length=10)
        address: Address
        # Bounded items: an unbounded string's length is the sample's luck (a seeded draw over float16 KV ran
        # one hobby past 250 tokens), and the test is about the constraints, not the model's prose.
        hobbies: list[Annotated[str, Field(max_length=24)]] = Field(max_length=3)

    class Answer(BaseModel):
        ok: bool
        score: int = Field(ge=1, le=5)

    with ServerThread(tiny_engine(None, max_model_len=1024)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for model, prompt in ((Person, "Describe a made-up person."), (Answer, "Is the sky blue? Rate it.")):
            for temperature in (0.0, 1.0):
                r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                  response_format=model, max_tokens=250, temperature=temperature,
                                                  seed=1)
                assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
                assert isinstance(r.choices[0].message.parsed, model)   # parse() validated it


def test_bench_structured_runs(tiny_model_dir):
    from kvloom.bench.structured import run_structured_bench
    r = run_structured_bench(EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20), [1, 4],
                             input_len=16, output_len=8, rounds=1)
    assert set(r["ttft_ms"]) == {"first_ever", "cold", "cached", "unconstrained"}
    assert r["batch_4_sampled"]["tpot_ms_constrained"] > 0 and r["batch_1_greedy"]["tpot_ms_unconstrained"] > 0


def test_ignore_eos_runs_while_the_grammar_allows_and_stops_when_it_is_complete(llm):
    r = llm.generate(random_prompts(2, seed=12), [_params({"regex": "(ab|cd)+"}, ignore_eos=True, max_tokens=12),
                                                  _params({"regex": "(ab){2}"}, ignore_eos=True, max_tokens=12)])
    assert r[0].finish_reason == "length" and re.fullmatch("(ab|cd)+", r[0].text)
    assert r[1].finish_reason == "stop" and r[1].text == "abab"


def test_a_grammar_that_fails_to_compile_ends_its_request(tiny_model_dir, monkeypatch):
    engine = Engine(EngineConfig(model=tiny_model_dir("llama"), kv_cache_memory=4 << 20))

    def boom(self, spec):
        time.sleep(0.05)
        raise InvalidRequestError("library failure", field=spec.field)
    monkeypatch.setattr(compiler_mod.GrammarCompiler, "_compile", boom)
    engine.add_request([5, 6, 7], _params({"regex": "q+"}, n=2), request_id="f")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    # "error", not "abort": the client asked for nothing to stop; the server failed it (and says why).
    assert sorted((o.index, o.finish_reason) for o in outs if o.finished) == [(0, "error"), (1, "error")]
    assert all("library failure" in o.error for o in outs if o.finished)
    assert engine.pool.num_free == engine.num_blocks


def test_lark_and_gbnf_grammars(llm):
    for g in ('start: "up" | "down" " below"', 'root ::= "up" | "down" " below"'):
        r = llm.generate(random_prompts(3, seed=13), _params({"grammar": g}, temperature=1.0, seed=2))
        assert all(x.text in ("up", "down below") and x.finish_reason == "stop" for x in r)
