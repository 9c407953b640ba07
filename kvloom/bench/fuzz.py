"""`kvloom bench fuzz`: the server's own OpenAPI document (/openapi.json), fuzzed with schemathesis.

Every operation gets bodies generated to fit its schema (positive) and mutated not to (negative),
each request with a timeout; the links between operations (an agent session's calls and its DELETE,
tokenize -> detokenize / completions) are walked as stateful sequences. The properties:

  - no 5xx, and responses match the document where it declares a response schema;
  - no request hangs (no answer within the timeout);
  - with an API key, every route but /health (and /metrics under --public-metrics) answers 401 without it;
  - afterwards the server answers a greedy completion exactly as before the run, with no request
    running or waiting and no KV block held (sessions the fuzzer opened are closed first).

`run_fuzz(base_url, ...)` fuzzes a running server and returns the result as a dict; `fuzz_in_process`
serves a model (by default a tiny random one, `build_tiny_model`) in this process and fuzzes it.
"""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

# Operations a session (session_id in the body) or a token list links to: the sequences of kvloom's API.
# schemathesis walks them in its stateful phase; the document alone has no links.
_SESSION_OPS = ("/v1/completions", "/v1/chat/completions")
# Routes that answer without a key when the server has one (/metrics too under --public-metrics).
PUBLIC = frozenset({"/health"})
# Where the document is known to disagree with the server: (operation, check title) pairs counted and reported
# apart, not as failures. None today.
DOC_GAPS: frozenset[tuple[str, str]] = frozenset()
# Routes outside the document that must be closed with an API key set, too.
UNDOCUMENTED = ("/openapi.json", "/docs", "/redoc", "/dashboard/stats", "/no-such-route")
PROBE_PROMPT = "The quick brown fox"


def add_links(doc: dict) -> dict:
    """The document with OpenAPI links for kvloom's multi-call sequences (a copy)."""
    doc = json.loads(json.dumps(doc))
    paths = doc["paths"]

    def link(src: str, name: str, target: str, method: str, **fields):
        ok = paths[src]["post"].setdefault("responses", {}).setdefault("200", {"description": "OK"})
        ref = "#/paths/" + target.replace("~", "~0").replace("/", "~1") + "/" + method
        ok.setdefault("links", {})[name] = {"operationRef": ref, **fields}

    for src in _SESSION_OPS:
        if src in paths and "/v1/sessions/{session_id}" in paths:
            link(src, "CloseSession", "/v1/sessions/{session_id}", "delete",
                 parameters={"session_id": "$request.body#/session_id"})
        for target in _SESSION_OPS:
            if src in paths and target in paths:   # the program's next call, same session
                link(src, "NextCall" + target.rsplit("/", 1)[-1].title(), target, "post",
                     requestBody={"session_id": "$request.body#/session_id"})
    if "/tokenize" in paths:
        if "/detokenize" in paths:
            link("/tokenize", "Detokenize", "/detokenize", "post", requestBody={"tokens": "$response.body#/tokens"})
        if "/v1/completions" in paths:
            link("/tokenize", "CompleteTokens", "/v1/completions", "post",
                 requestBody={"prompt": "$response.body#/tokens"})
    return doc


class _Tally:
    """Sends cases and keeps what came back: per-operation counts and the first few failures."""

    def __init__(self, base_url: str, api_key: str | None, model_name: str | None, timeout: float,
                 max_reported: int, public_paths: frozenset[str] = PUBLIC):
        from schemathesis.checks import not_a_server_error, response_schema_conformance
        self.checks = [not_a_server_error, response_schema_conformance]
        self.base_url, self.api_key, self.model_name = base_url, api_key, model_name
        self.timeout, self.max_reported = timeout, max_reported
        self.ops: dict[str, dict] = {}
        self.sessions: set[str] = set()
        self.public_paths = public_paths
        self.doc_gaps: Counter = Counter()

    def _op(self, label: str) -> dict:
        return self.ops.setdefault(label, {"cases": Counter(), "status": Counter(), "server_errors": 0, "hangs": 0,
                                           "failures": 0, "failure_kinds": Counter(), "first_failures": [],
                                           "skipped": [], "refused_param": Counter()})

    def pin_model(self, case):
        # A random model name is a 404 before the rest of the body is looked at; with the served name the
        # body reaches the engine. A copy, not an edit: Hypothesis may still hold the drawn dict.
        if self.model_name and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body = {**case.body, "model": self.model_name}
        return case

    def _curl(self, case) -> str:
        headers = {"Authorization": "Bearer $KVLOOM_API_KEY"} if self.api_key else None
        return case.as_curl_command(headers=headers, base_url=self.base_url)

    def _fail(self, op: dict, case, kind: str, message: str, status: int | None = None) -> None:
        op["failures"] += 1
        op["failure_kinds"][kind] += 1
        if len(op["first_failures"]) < self.max_reported:
            plain = isinstance(case.body, (dict, list, str, int, float, bool, type(None)))
            body = case.body if plain else repr(case.body)
            op["first_failures"].append({"kind": kind, "status": status, "message": message[:500],
                                         "body": body, "curl": self._curl(case)})

    def call_kwargs(self, with_key: bool = True) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key and with_key else {}
        return {"base_url": self.base_url, "timeout": self.timeout, "headers": headers}

    def send(self, case, mode: str):
        """One case: the 401 probe (with a key set), then the real call and its checks. The response, or None."""
        import requests
        from schemathesis.core.failures import FailureGroup

        op = self._op(case.operation.label)
        op["cases"][mode] += 1
        if isinstance(case.body, dict) and case.body.get("session_id") and isinstance(case.body["session_id"], str):
            self.sessions.add(case.body["session_id"])
        if self.api_key:
            try:
                bare = case.call(**self.call_kwargs(with_key=False))
                public = case.operation.path in self.public_paths
                if (bare.status_code == 401) == public:
                    self._fail(op, case, "auth", f"without the API key: {bare.status_code}", bare.status_code)
            except requests.RequestException as e:
                self._fail(op, case, "transport", f"without the API key: {e!r}")
        started = time.monotonic()
        try:
            response = case.call(**self.call_kwargs())
        except requests.Timeout:
            op["hangs"] += 1
            self._fail(op, case, "hang", f"no answer within {self.timeout} s")
            return None
        except requests.RequestException as e:
            self._fail(op, case, "transport", repr(e))
            return None
        # The timeout bounds each read; a stream could trickle past it, so the whole call is bounded too.
        if time.monotonic() - started > self.timeout:
            op["hangs"] += 1
            self._fail(op, case, "hang", f"answered after {time.monotonic() - started:.1f} s", response.status_code)
        op["status"][response.status_code] += 1
        if response.status_code >= 500:
            op["server_errors"] += 1
        elif response.status_code == 400:   # which field refusals name: how far bodies got
            with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
                op["refused_param"][str(response.json()["error"]["param"])] += 1
        try:
            case.validate_response(response, checks=self.checks)
        except FailureGroup as group:
            for f in group.exceptions:
                title = getattr(f, "title", type(f).__name__)
                if (case.operation.label, title) in DOC_GAPS:
                    self.doc_gaps[f"{case.operation.label}: {title}"] += 1
                else:
                    self._fail(op, case, title, getattr(f, "message", str(f)), response.status_code)
        if (problem := _error_shape_problem(response)) is not None:
            self._fail(op, case, "error shape", problem, response.status_code)
        return response


def _error_shape_problem(response) -> str | None:
    """kvloom's refusals are OpenAI's error shape (protocol.error_body); the document does not say so,
    so this is checked here rather than by schemathesis."""
    if response.status_code < 400 or "json" not in response.headers.get("content-type", ""):
        return None
    try:
        err = response.json().get("error")
    except (ValueError, AttributeError):
        return "a JSON error response that is not an object"
    if not (isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)):
        return f"not OpenAI's error shape: {response.text[:200]}"
    return None


def _settings(examples: int, **kw):
    import hypothesis
    # No shrinking (failures are recorded, not raised) and no example database: a run is its seed.
    return hypothesis.settings(max_examples=examples, deadline=None, database=None, print_blob=False,
                               suppress_health_check=list(hypothesis.HealthCheck),
                               phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate], **kw)


def _fuzz_operation(tally: _Tally, operation, mode, examples: int, seed: int) -> None:
    import hypothesis
    from hypothesis.errors import Unsatisfiable

    strategy = operation.as_strategy(generation_mode=mode).map(tally.pin_model)

    @hypothesis.seed(seed)
    @_settings(examples)
    @hypothesis.given(case=strategy)
    def run(case):
        tally.send(case, mode.value)

    try:
        run()
    except Unsatisfiable:
        tally._op(operation.label)["skipped"].append(f"{mode.value}: no such input exists (e.g. no request "
                                                     "that violates the schema of an operation without inputs)")


def _fuzz_stateful(tally: _Tally, schema, scenarios: int, seed: int, max_restarts: int = 20) -> dict:
    import hypothesis
    from hypothesis.errors import Flaky
    from schemathesis.generation.stateful import run_state_machine_as_test
    from schemathesis.generation.stateful.state_machine import StepOutput

    stats = {"scenarios": 0, "steps": 0, "linked_steps": 0, "restarts": 0}

    class Machine(schema.as_state_machine()):
        def setup(self):
            stats["scenarios"] += 1

        def get_call_kwargs(self, case):
            return tally.call_kwargs()

        def step(self, input):
            # Checked and recorded like any other case; None (no output to link from) when it had no answer.
            stats["steps"] += 1
            stats["linked_steps"] += input.transition is not None
            response = tally.send(tally.pin_model(input.case), "stateful")
            return None if response is None else StepOutput(response, input.case)

    # Which links a scenario can follow depends on the server's answers (a 200 feeds the next call, a 400
    # does not), so a replayed prefix may draw differently: Hypothesis calls that flaky. schemathesis's own
    # runner starts the suite again then; so does this, on the next seed, until the scenarios are run.
    while stats["scenarios"] < scenarios and stats["restarts"] <= max_restarts:
        left = scenarios - stats["scenarios"]
        try:
            run_state_machine_as_test(hypothesis.seed(seed + stats["restarts"])(Machine),
                                      settings=_settings(left, stateful_step_count=6))
            break
        except Flaky:
            stats["restarts"] += 1
        except Exception as e:
            stats["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            break
    return stats


def _get_json(client, url: str) -> dict:
    r = client.get(url)
    r.raise_for_status()
    return r.json()


def _probe(client, base_url: str, model: str) -> dict:
    """A greedy completion: the same text before and after the run means the server still serves."""
    r = client.post(base_url + "/v1/completions", json={"model": model, "prompt": PROBE_PROMPT, "max_tokens": 8,
                                                         "temperature": 0, "ignore_eos": True})
    if r.status_code != 200:
        return {"status": r.status_code, "error": r.text[:500]}
    body = r.json()
    return {"status": 200, "text": body["choices"][0]["text"], "completion_tokens": body["usage"]["completion_tokens"]}


def _gauges(client, base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = client.get(base_url + "/metrics").text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def _after_run(client, base_url: str, model: str, baseline: dict, sessions: set[str],
               settle_s: float = 30.0) -> dict:
    # The fuzzer's sessions keep their KV on purpose (kvloom/kv/session_store.py); close them, then nothing
    # may hold a block.
    closed, unclosable = 0, []
    for sid in sorted(sessions):
        r = client.delete(base_url + "/v1/sessions/" + urllib.parse.quote(sid, safe=""))
        if r.status_code == 200:
            closed += bool(r.json().get("deleted"))
        else:
            unclosable.append({"session_id": sid, "status": r.status_code})
    health = client.get(base_url + "/health").status_code
    probe = _probe(client, base_url, model)
    deadline = time.monotonic() + settle_s
    while True:
        g = _gauges(client, base_url)
        idle = {k: g.get(k) for k in ("kvloom_num_requests_running", "kvloom_num_requests_waiting",
                                      "kvloom_kv_cache_blocks_used")}
        if all(v == 0 for v in idle.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {"health_status": health, "probe": probe, "probe_matches_baseline": probe == baseline,
            "sessions_closed": closed, "sessions_seen": len(sessions),
            "sessions_unclosable": unclosable, **idle,
            "ok": health == 200 and probe == baseline and all(v == 0 for v in idle.values())}


def run_fuzz(base_url: str, examples: int = 50, api_key: str | None = None, seed: int = 0, timeout: float = 60.0,
             stateful_examples: int | None = None, max_reported: int = 3, modes=("positive", "negative"),
             path_regex: str | None = None, public_paths: frozenset[str] = PUBLIC, settle_s: float = 30.0) -> dict:
    """Fuzz the server at base_url: `examples` generated cases per operation and mode, `stateful_examples`
    scenarios (default: examples; 0: none), only paths matching path_regex if given; settle_s: how long the
    server may take to go idle afterwards. The result as a dict; result["ok"] is every property holding."""
    import httpx
    import schemathesis
    from schemathesis import GenerationMode

    base_url = base_url.rstrip("/")
    started = time.monotonic()
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # The fuzzer's own calls (document, probe, gauges) are not under test: a timeout they cannot trip.
    with httpx.Client(timeout=max(timeout, 60.0), headers=auth) as client:
        doc = _get_json(client, base_url + "/openapi.json")
        model = _get_json(client, base_url + "/v1/models")["data"][0]["id"]
        baseline = _probe(client, base_url, model)
        schema = schemathesis.openapi.from_dict(add_links(doc))
        if path_regex:
            schema = schema.include(path_regex=path_regex)
        tally = _Tally(base_url, api_key, model, timeout, max_reported, public_paths)
        for operation in [r.ok() for r in schema.get_all_operations()]:
            for mode in modes:
                _fuzz_operation(tally, operation, GenerationMode(mode), examples, seed)
        scenarios = examples if stateful_examples is None else stateful_examples
        stateful = _fuzz_stateful(tally, schema, scenarios, seed) if scenarios else None
        unauthorized = _undocumented_auth(base_url, max(timeout, 60.0)) if api_key else None
        after = _after_run(client, base_url, model, baseline, tally.sessions, settle_s)
    ops = {label: {**v, "cases": dict(v["cases"]), "status": {str(k): n for k, n in sorted(v["status"].items())},
                   "failure_kinds": dict(v["failure_kinds"]), "refused_param": dict(v["refused_param"].most_common())}
           for label, v in tally.ops.items()}
    totals = {"cases": sum(sum(v["cases"].values()) for v in ops.values()),
              "server_errors": sum(v["server_errors"] for v in ops.values()),
              "hangs": sum(v["hangs"] for v in ops.values()),
              "failures": sum(v["failures"] for v in ops.values())}
    # An operation whose schema-valid bodies could not be generated at all was not tested: that fails too.
    untested = [label for label, v in ops.items() if not v["cases"].get("positive")]
    ok = (totals["failures"] == 0 and after["ok"] and not untested and not (stateful or {}).get("error")
          and not (unauthorized or {}).get("open"))
    return {"base_url": base_url, "model": model, "api_key": bool(api_key), "examples_per_operation_and_mode": examples,
            "seed": seed, "timeout_s": timeout, "schemathesis": schemathesis.SCHEMATHESIS_VERSION,
            "checks": [c.__name__ for c in tally.checks] + ["openai_error_shape", "api_key_required"],
            "operations": ops, "untested_operations": untested, "stateful": stateful,
            "undocumented_routes_without_key": unauthorized, "known_doc_gaps": dict(tally.doc_gaps),
            "totals": totals, "after_run": after, "elapsed_s": round(time.monotonic() - started, 1), "ok": ok}


def _undocumented_auth(base_url: str, timeout: float) -> dict:
    """With a key set, routes outside the document answer 401 without it too."""
    import httpx
    got = {p: httpx.get(base_url + p, timeout=timeout).status_code for p in UNDOCUMENTED}
    return {"status": got, "open": [p for p, s in got.items() if s != 401]}


# ---- a server in this process ------------------------------------------------------------------

def build_tiny_model(directory: str, seed: int = 0) -> str:
    """A tiny random Llama (2 layers, hidden 64, 384-token BPE trained on Python's pydoc topics, context 256)
    written as a Hugging Face directory: fast enough to fuzz thousands of requests against."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from pydoc_data.topics import topics

    out = Path(directory)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return str(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    text = "\n".join(topics[k] for k in sorted(topics))[:400_000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)],
                            trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                         initializer_range=0.1))
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return str(out)


@contextlib.contextmanager
def serve_in_thread(engine, name: str = "tiny", api_key: str | None = None):
    """A kvloom server on a free loopback port in a background thread; yields its base URL."""
    import uvicorn

    from kvloom.server.app import ServerSettings, build_app
    from kvloom.server.async_engine import AsyncEngine
    from kvloom.server.metrics import ServerMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, on_step=metrics.observe_engine)
    app = build_app(async_engine, ServerSettings(name, api_key), metrics)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def fuzz_in_process(model: str | None, examples: int, api_keys=(None,), kv_cache_memory: int = 64 << 20,
                    **kw) -> dict:
    """Serve `model` (default: a tiny random model, built in a temporary directory) in this process and fuzz
    it once per API key setting (None: no key)."""
    import tempfile

    from kvloom.config import EngineConfig
    from kvloom.engine.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        model = model or build_tiny_model(str(Path(tmp) / "tiny-llama"))
        engine = Engine(EngineConfig(model=model, kv_cache_memory=kv_cache_memory))
        runs = []
        for key in api_keys:
            with serve_in_thread(engine, api_key=key) as url:
                result = run_fuzz(url, examples, api_key=key, **kw)
            # In this process the engine itself can be asked too, not only its gauges (its loop has stopped).
            state = {"pool_used": engine.pool.num_used, "unfinished": engine.has_unfinished(),
                     "session_blocks": engine.sessions.num_blocks_held}
            result["after_run"]["engine"] = state
            result["ok"] = result["ok"] and state == {"pool_used": 0, "unfinished": False, "session_blocks": 0}
            runs.append(result)
        return {"model": model if not model.startswith(tmp) else "tiny random Llama (build_tiny_model)",
                "max_model_len": engine.max_model_len, "runs": runs, "ok": all(r["ok"] for r in runs)}


def add_fuzz_args(p) -> None:
    p.add_argument("--examples", type=int, default=100,
                   help="generated cases per operation, positive and negative each")
    p.add_argument("--stateful-examples", type=int, default=None,
                   help="stateful scenarios (linked calls: session -> its next call -> DELETE, tokenize -> "
                        "detokenize); default: --examples, 0: none")
    p.add_argument("--model", default=None,
                   help="serve this model here (default: a tiny random Llama built on the fly)")
    p.add_argument("--base-url", default=None, help="fuzz this running server instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None,
                   help="with --base-url: the server's key; in process: the key of the second run (default fuzz-key)")
    p.add_argument("--public-metrics", action="store_true",
                   help="with --base-url and --api-key: the server was started with --public-metrics")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed: the same seed sends the same cases")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take before it counts as a hang")
    p.add_argument("--out", default=None, help="write the JSON result here")


def cmd_bench_fuzz(args) -> None:
    from kvloom.errors import KvloomError
    try:
        import schemathesis  # noqa: F401
    except ImportError as e:
        raise KvloomError("kvloom bench fuzz needs schemathesis: pip install 'schemathesis>=4.32,<5'") from e
    kw = dict(seed=args.seed, timeout=args.timeout, stateful_examples=args.stateful_examples)
    if args.base_url:
        public = PUBLIC | ({"/metrics"} if args.public_metrics else set())
        run = run_fuzz(args.base_url, args.examples, api_key=args.api_key, public_paths=public, **kw)
        result = {"runs": [run], "ok": run["ok"]}
    else:   # once without a key, once with one
        result = fuzz_in_process(args.model, args.examples, api_keys=(None, args.api_key or "fuzz-key"), **kw)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(summary(result))
    if not result["ok"]:
        raise SystemExit(1)


def summary(result: dict) -> str:
    lines = []
    for run in result["runs"]:
        t = run["totals"]
        lines.append(f"api key {'on ' if run['api_key'] else 'off'}: {t['cases']} cases over {len(run['operations'])} "
                     f"operations ({run['stateful']['steps'] if run['stateful'] else 0} in stateful scenarios), "
                     f"{t['server_errors']} 5xx, {t['hangs']} hangs, {t['failures']} failures; after the run: "
                     f"{'ok' if run['after_run']['ok'] else 'NOT OK'}; {run['elapsed_s']} s")
    return "\n".join(lines)
