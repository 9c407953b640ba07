"""`kvloom bench structured`: what structured outputs cost.

- TPOT of constrained (JSON schema) against unconstrained requests at batch 1 and 32, in the same run and
  engine, alternating rounds (the best round of each counts): the goal is at most 5% slower at 32.
- TTFT of a constrained request including its grammar: cold (a schema never seen; the very first also builds
  the library's view of the vocabulary) and cached (the same schema again).
- `--libraries`: the two grammar libraries side by side on the default model's vocabulary (per-token mask
  time, compile time): the measurement behind choosing llguidance (kvloom/structured/backend.py).

Servers side by side (kvloom against llama-server on the same GGUF): --serve-url, bench/structured_servers.py.
"""
from __future__ import annotations

import json
import statistics
import time
import uuid

from kvloom.config import EngineConfig
from kvloom.sampling_params import SamplingParams

# Long enough to fill output_len tokens (every request ends by length, constrained or not). (Not a string
# with a large minLength: counting characters in the lexer makes some masks take milliseconds.)
LONG_SCHEMA = {"type": "object", "properties": {"lines": {"type": "array", "minItems": 40,
                                                          "items": {"type": "string", "maxLength": 60}}},
               "required": ["lines"], "additionalProperties": False}
PERSON_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}, "kind": {"enum": ["a", "b", "c"]},
    "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street"]}, "score": {"type": "number"}},
    "required": ["name", "age", "tags", "kind", "address"], "additionalProperties": False}
PERSON_JSON = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "kind": "b",
                          "address": {"street": "St James Square 12", "zip": "12345"}, "score": 9.5})


def _run_batch(engine, prompts, params) -> dict:
    """Run the requests to the end; mean TTFT and TPOT (seconds) over them."""
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params, request_id=uuid.uuid4().hex)
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = (now, len(out.token_ids))
    tpots = [(end - first[r]) / (n - 1) for r, (end, n) in done.items() if n > 1]
    return {"ttft_s": statistics.mean(first[r] - t0 for r in done), "tpot_s": statistics.mean(tpots),
            "tokens": sum(n for _, n in done.values())}


def run_structured_bench(config: EngineConfig, batch_sizes=(1, 32), input_len: int = 64, output_len: int = 64,
                         rounds: int = 2) -> dict:
    from kvloom.engine.engine import Engine
    engine = Engine(config)
    tok = engine.tokenizer
    words = ("Write a long story about a lighthouse keeper and the sea, in JSON. " * 50).split()
    prompt = tok.encode(" ".join(words)[: input_len * 6])[:input_len]
    kinds = {}
    for temp in (0.0, 0.8):   # greedy rows mostly skip the mask (their argmax is allowed); sampled rows never do
        kinds[temp] = (SamplingParams(temperature=temp, seed=1, max_tokens=output_len, ignore_eos=True),
                       SamplingParams(temperature=temp, seed=1, max_tokens=output_len, ignore_eos=True,
                                      structured_outputs={"json": LONG_SCHEMA}))
    from kvloom.system_info import engine_description
    result: dict = {"model": engine.source.name, "input_len": input_len, "output_len": output_len,
                    "grammar_library": "llguidance", "stack": engine_description(engine)}
    # TTFT with the grammar: the first constrained request also builds the library's vocabulary view.
    ttft, last = {}, None
    for name, schema in (("first_ever", {**PERSON_SCHEMA, "title": uuid.uuid4().hex}),
                         ("cold", {**PERSON_SCHEMA, "title": uuid.uuid4().hex}), ("cached", None)):
        schema = schema or last
        last = schema
        p = SamplingParams(temperature=0.0, max_tokens=2, structured_outputs={"json": schema})
        ttft[name] = _run_batch(engine, [prompt], p)["ttft_s"]
    plain_ttft = _run_batch(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=2))["ttft_s"]
    result["ttft_ms"] = {k: round(v * 1e3, 1) for k, v in {**ttft, "unconstrained": plain_ttft}.items()}
    for b in batch_sizes:
        for temp, (plain, constrained) in kinds.items():
            best = {"unconstrained": None, "constrained": None}
            for _ in range(rounds):
                for name, params in (("unconstrained", plain), ("constrained", constrained)):
                    r = _run_batch(engine, [prompt] * b, params)
                    if best[name] is None or r["tpot_s"] < best[name]["tpot_s"]:
                        best[name] = r
            u, c = best["unconstrained"]["tpot_s"], best["constrained"]["tpot_s"]
            result[f"batch_{b}_{'greedy' if temp == 0 else 'sampled'}"] = {
                "tpot_ms_unconstrained": round(u * 1e3, 2), "tpot_ms_constrained": round(c * 1e3, 2),
                "constrained_slower_pct": round((c / u - 1) * 100, 1)}
    return result


# JSON-schema features a client may send (pydantic emits most of them): which each library refuses to compile.
# (A library may also compile a feature it does not enforce; this lists only the refusals.)
COVERAGE = {
    "$ref/$defs": {"$defs": {"a": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "enum+const": {"type": "object", "properties": {"a": {"enum": [1, "x", None]}, "b": {"const": "k"}}},
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format email": {"type": "string", "format": "email"},
    "integer bounds": {"type": "integer", "minimum": -5, "exclusiveMaximum": 100},
    "number bounds": {"type": "number", "minimum": 0.5, "maximum": 2.5},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "min/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "recursive": {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array",
                                                                            "items": {"$ref": "#/$defs/n"}}}}},
                  "$ref": "#/$defs/n"},
    "if/then/else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
}


def compare_libraries(tokenizer_hf=None, vocab_size: int = 49152) -> dict:
    """Per-token mask time (median, p90, max over a 65-token JSON document) and compile time of each grammar
    library installed, on the default model's vocabulary."""
    import torch
    if tokenizer_hf is None:
        from kvloom.models.model_source import resolve_model
        from kvloom.tokenizer import Tokenizer
        tokenizer_hf = Tokenizer.load(resolve_model(None), None, None).hf
    ids = tokenizer_hf.encode(PERSON_JSON, add_special_tokens=False)
    out = {}

    def summary(setup, compile_, cached, times):
        times = sorted(times)
        return {"vocab_setup_ms": round(setup * 1e3, 1), "compile_ms": round(compile_ * 1e3, 2),
                "cached_compile_ms": round(cached * 1e3, 2), "mask_us_median": round(statistics.median(times) * 1e6, 1),
                "mask_us_p90": round(times[int(0.9 * len(times))] * 1e6, 1), "mask_us_max": round(times[-1] * 1e6, 1)}

    try:
        import llguidance
        import llguidance.hf
        t0 = time.perf_counter()
        lltok = llguidance.hf.from_tokenizer(tokenizer_hf, vocab_size)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(PERSON_SCHEMA))
        m = llguidance.LLMatcher(lltok, grammar)
        compile_ = time.perf_counter() - t0
        mask = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            times.append(time.perf_counter() - t0)
            m.consume_token(t)
        t0 = time.perf_counter()
        llguidance.LLMatcher(lltok, grammar).unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        out["llguidance"] = summary(setup, compile_, time.perf_counter() - t0, times)
        out["llguidance"]["rejects"] = [
            k for k, sch in COVERAGE.items()
            if llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(sch)))
            .split("WARNING")[0].strip()]
    except ImportError as e:
        out["llguidance"] = f"not installed ({e})"
    try:
        import xgrammar as xgr
        t0 = time.perf_counter()
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer_hf, vocab_size=vocab_size))
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        cg = compiler.compile_json_schema(json.dumps(PERSON_SCHEMA))
        compile_ = time.perf_counter() - t0
        m = xgr.GrammarMatcher(cg)
        bm = xgr.allocate_token_bitmask(1, vocab_size)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bm, 0)
            times.append(time.perf_counter() - t0)
            m.accept_token(t)
        t0 = time.perf_counter()
        xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(PERSON_SCHEMA))).fill_next_token_bitmask(bm, 0)
        out["xgrammar"] = summary(setup, compile_, time.perf_counter() - t0, times)
        bad = []
        for k, sch in COVERAGE.items():
            try:
                compiler.compile_json_schema(json.dumps(sch))
            except Exception:
                bad.append(k)
        out["xgrammar"]["rejects"] = bad
    except ImportError as e:
        out["xgrammar"] = f"not installed (pip install xgrammar --no-deps to compare: {e})"
    return out
