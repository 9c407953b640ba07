"""`kvloom generate | chat | serve | bench`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from kvloom.config import KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig, parse_size
from kvloom.errors import KvloomError


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:
        p.add_argument("model", nargs="?", default=None,
                       help="HF model directory or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    else:
        p.add_argument("--model", default=None,
                       help="HF model directory or .gguf file (default: built-in SmolLM2-135M-Instruct)")
    d = EngineConfig()
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, if not the model's own")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=d.quantization, choices=list(QUANTIZATIONS),
                   help="weights: auto (a GGUF's 4-bit blocks on the native kernel, 8-bit GGUFs in w8a8, else as "
                        "stored), none (as "
                        "stored, fp32: the reference mode), int8/int4 weight-only, w8a8 (int8 weights and "
                        "activations), gguf (the file's Q4 blocks x int8 activations)")
    p.add_argument("--quantization-group-size", type=int, default=d.quantization_group_size, choices=[32, 64, 128],
                   help="int4 group size")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                   help="KV cache precision: auto (float16 when the weights run quantized and the vector "
                        "attention kernels read it, as llama.cpp's default; else the model's dtype, so the "
                        "reference mode stays exact), float32, "
                        "bfloat16, float16 (half float32's bytes, rounded to nearest), or int8 (keys per channel, "
                        "values per token)")
    p.add_argument("--no-window-kv-release", dest="window_kv_release", action="store_false",
                   help="keep sliding-window layers' KV for the whole context (by default a model with sliding-window "
                        "layers, e.g. Gemma 3, frees their KV behind the window)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument("--kv-cache-memory", type=parse_size, default=d.kv_cache_memory,
                   help="bytes for the KV cache, e.g. 512MiB or 2GiB (default 1GiB)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="running requests at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one forward pass (Dynamic SplitFuse)")
    p.add_argument("--tpot-target-ms", type=float, default=None,
                   help="keep steps that carry decodes under this many ms: prompt chunks sized to fit, new requests "
                        "wait while the decodes fill it (learned from the steps; `serve` defaults to 100, 0: off)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse KV blocks of identical leading tokens across requests")
    p.add_argument("--session-kv-fraction", type=float, default=d.session_kv_fraction,
                   help="share of the KV pool kept for idle agent sessions (requests with a session_id)")
    p.add_argument("--session-ttl", type=float, default=d.session_ttl,
                   help="seconds an idle session's KV is kept")
    p.add_argument("--speculative", default=d.speculative, choices=["none", "lookahead"],
                   help="speculative decoding without a draft model: n-gram trie drafts, verified losslessly")
    p.add_argument("--spec-max-tokens", type=int, default=d.spec_max_tokens,
                   help="draft tokens per request per step at most")
    p.add_argument("--spec-branches", type=int, default=d.spec_branches, help="children per draft-tree node at most")
    p.add_argument("--no-native-kernels", dest="native_kernels", action="store_false",
                   help="run attention and linear layers in plain PyTorch instead of the compiled C++ kernels")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (loadable at run time)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", type=_lora_module,
                   help="peft adapter directories served as models NAME (implies --enable-lora)")
    p.add_argument("--max-loras", type=int, default=d.max_loras, help="adapters in one batch at most (LRU slots)")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    p.add_argument("--enable-fine-tuning", action="store_true",
                   help="train LoRA adapters while serving (/v1/files, /v1/fine_tuning/jobs; implies --enable-lora)")
    p.add_argument("--fine-tuning-dir", default=None,
                   help="where finished adapters are saved (default: a new temporary directory)")
    p.add_argument("--fine-tuning-step-ms", type=float, default=d.fine_tuning_step_ms,
                   help="fine-tuning fills each engine step up to this many ms; inference always goes first")


def engine_config(args) -> EngineConfig:
    return EngineConfig(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                        quantization=args.quantization, quantization_group_size=args.quantization_group_size,
                        kv_cache_dtype=args.kv_cache_dtype, window_kv_release=args.window_kv_release,
                        speculative=args.speculative,
                        native_kernels=args.native_kernels,
                        spec_max_tokens=args.spec_max_tokens, spec_branches=args.spec_branches,
                        max_model_len=args.max_model_len, block_size=args.block_size,
                        kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
                        tpot_target_ms=args.tpot_target_ms or None,
                        num_threads=args.num_threads, enable_prefix_caching=args.enable_prefix_caching,
                        session_kv_fraction=args.session_kv_fraction, session_ttl=args.session_ttl,
                        enable_lora=args.enable_lora, lora_modules=tuple(args.lora_modules),
                        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                        enable_fine_tuning=args.enable_fine_tuning, fine_tuning_dir=args.fine_tuning_dir,
                        fine_tuning_step_ms=args.fine_tuning_step_ms)


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"give NAME=PATH, got {text!r}")
    return name, path


def _sampling(args):
    from kvloom.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def _add_sampling_args(p):
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampled tokens")


def _stream(engine, prompt_ids, params) -> str:
    """Generate one reply, printing text as it comes."""
    engine.add_request(prompt_ids, params)
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            text = out.text
    sys.stdout.write("\n")
    return text


def cmd_generate(args) -> None:
    from kvloom.engine.engine import Engine
    engine = Engine(engine_config(args))
    tok = engine.tokenizer
    if args.raw or not tok.hf.chat_template:
        ids = tok.encode(args.prompt)
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    _stream(engine, ids, _sampling(args))


def cmd_chat(args) -> None:
    from kvloom.engine.engine import Engine
    engine = Engine(engine_config(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kvloom chat: type a message; Ctrl-D or 'exit' quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream(engine, engine.tokenizer.apply_chat_template(messages), _sampling(args))
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> None:
    from kvloom.server.cluster_serving import ClusterOptions
    from kvloom.server.launch import serve, serve_models
    from kvloom.server.limits import ServerLimits
    limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens=args.max_tokens_limit, max_n=args.max_n, max_logprobs=args.max_logprobs,
                          max_stop_strings=args.max_stop_strings, max_stop_length=args.max_stop_length,
                          max_streams_per_key=args.max_streams_per_key)
    if args.models and args.model:
        raise KvloomError("give the model as a path or as --model NAME=PATH (repeatable), not both")
    cluster = ClusterOptions(instances=args.instances, dispatch=args.dispatch, ray_address=args.ray_address,
                             threads_per_instance=args.threads_per_instance, placement=args.placement,
                             migration=not args.no_migration)
    if len(args.models) > 1 or args.route:
        import dataclasses
        from kvloom.router.routes import parse_route
        if len({n for n, _ in args.models}) != len(args.models):
            raise KvloomError("each --model NAME must be different")
        base = engine_config(args)
        models = args.models or [(args.served_model_name or "default", None)]
        serve_models({n: dataclasses.replace(base, model=None if p == "default" else p) for n, p in models},
                     [parse_route(r) for r in args.route], args.max_loaded_models, args.model_idle_seconds,
                     host=args.host, port=args.port, api_key=tuple(args.api_key or ()), limits=limits,
                     public_metrics=args.public_metrics, max_waiting_requests=args.max_waiting_requests,
                     graceful_shutdown_s=args.graceful_shutdown, tool_call_parser=args.tool_call_parser,
                     reasoning_parser=args.reasoning_parser, cluster=cluster)
        return
    if args.models:     # one --model NAME=PATH: the single-model server under that name
        (args.served_model_name, args.model), = args.models
    serve(engine_config(args), host=args.host, port=args.port, api_key=tuple(args.api_key or ()), limits=limits,
          public_metrics=args.public_metrics,
          served_model_name=args.served_model_name, max_waiting_requests=args.max_waiting_requests,
          graceful_shutdown_s=args.graceful_shutdown, cluster=cluster, tool_call_parser=args.tool_call_parser,
          reasoning_parser=args.reasoning_parser)


def _emit(result: dict, out: str | None, text: str | None = None) -> None:
    """Print a benchmark's result (as JSON, or as the given table) and write its JSON to `out` if given."""
    print(text if text is not None else json.dumps(result, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


def cmd_bench(args) -> None:
    if args.bench == "prefix":
        from kvloom.bench.prefix_reuse import agent_turns, shared_prefix
        config = engine_config(args)
        result = {"shared_prefix": shared_prefix(config, args.prefix_len, args.suffix_len, args.num_requests,
                                                 args.output_len),
                  "agent": agent_turns(config, args.agents, args.turns, args.prefix_len, args.tool_len,
                                       args.output_len, args.traffic_per_turn, args.traffic_len)}
        _emit(result, args.out)
        return
    if args.bench == "spec":
        from kvloom.bench.speculative import run_spec_comparison
        result = run_spec_comparison(engine_config(args), args.workload, args.num_requests, args.input_len,
                                     args.output_len, args.concurrency, args.rounds)
        _emit(result, args.out)
        return
    if args.bench == "structured":
        from kvloom.bench.structured import compare_libraries, run_structured_bench
        from kvloom.bench.structured_servers import compare_servers
        result = compare_servers(args.serve_url, num_requests=args.num_requests, max_tokens=args.output_len,
                                 rounds=args.rounds) if args.serve_url else \
            compare_libraries() if args.libraries else run_structured_bench(
            engine_config(args), [int(x) for x in args.batch_sizes.split(",")], args.input_len, args.output_len,
            args.rounds)
        _emit(result, args.out)
        return
    if args.bench == "moe":
        from kvloom.bench.moe import format_table, run_moe_bench
        result = run_moe_bench(args.hidden, args.intermediate, args.experts, args.top_k,
                               [int(x) for x in args.batch_sizes.split(",")], args.repeats, args.threads)
        _emit(result, args.out, format_table(result))
        return
    if args.bench == "scaling":
        from kvloom.bench.scaling import format_table, plot, run_scaling_bench
        result = run_scaling_bench(engine_config(args), args.items, args.max_n, args.temperature, args.max_tokens,
                                   [float(x) for x in args.confidences.split(",")], args.share_prompt_len,
                                   args.share_n, args.share_output_len, args.repeats, args.task_seed,
                                   tuple(args.parts.split(",")))
        _emit(result, args.out, format_table(result))
        if args.plot and "accuracy" in result:
            plot(result, args.plot)
        return
    if args.bench == "migration":
        from kvloom.bench.migration import format_table, run_migration_bench
        result = run_migration_bench(engine_config(args), [int(x) for x in args.contexts.split(",")], args.repeats)
        _emit(result, args.out, format_table(result))
        return
    if args.bench == "soak":
        from kvloom.bench.soak import cmd_bench_soak
        cmd_bench_soak(args)
        return
    if args.bench == "fuzz":
        from kvloom.bench.fuzz import cmd_bench_fuzz
        cmd_bench_fuzz(args)
        return
    if args.bench in ("serve", "sweep"):
        from kvloom.bench.serve import cmd_bench_serve, cmd_bench_sweep
        (cmd_bench_serve if args.bench == "serve" else cmd_bench_sweep)(args)
        return
    from kvloom.bench.hardware import measure_bandwidth_gbs, measure_matmul_gflops
    from kvloom.system_info import engine_description
    from kvloom.bench.offline import run_latency, run_throughput
    from kvloom.bench.peers import format_peers, run_peers
    from kvloom.engine.engine import Engine
    engine = Engine(engine_config(args))
    if args.bench == "latency":
        result = {"kvloom": run_latency(engine, args.input_len, args.output_len, args.iters,
                                        bandwidth_gbs=measure_bandwidth_gbs())}
    elif args.bench == "throughput":
        result = {"kvloom": run_throughput(engine, args.num_prompts, args.input_len, args.output_len,
                                           matmul_gflops=measure_matmul_gflops())}
    else:
        result = run_peers(engine, args)
        print(format_peers(result))
    result["stack"] = engine_description(engine)
    print(json.dumps(result, indent=2, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


def _add_limit_args(s) -> None:
    """What one request may ask (kvloom/server/limits.py); each breach is a 4xx naming the flag."""
    from kvloom.server.limits import ServerLimits
    d = ServerLimits()
    s.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="request body size (413)")
    s.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="tokens of one prompt (default: the model's context)")
    s.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                   help="the largest max_tokens a request may ask (default: what the context leaves)")
    s.add_argument("--max-n", type=int, default=d.max_n, help="samples per prompt (n)")
    s.add_argument("--max-logprobs", type=int, default=d.max_logprobs, help="top_logprobs / logprobs")
    s.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings)
    s.add_argument("--max-stop-length", type=int, default=d.max_stop_length, help="characters of one stop string")
    s.add_argument("--max-streams-per-key", type=int, default=d.max_streams_per_key,
                   help="streaming responses open at once per API key (429 past it)")


def _add_serve_bench_args(p) -> None:
    from kvloom.bench.workloads import WORKLOADS
    p.add_argument("--base-url", action="append", required=True, help="server to load (repeat to compare)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--workload", default="poisson", choices=WORKLOADS)
    p.add_argument("--trace", default=None, help="a CSV with BurstGPT or Azure columns (overrides --workload)")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="trace replay speed: gaps are divided by this (2 = twice the trace's rate)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of the gaps: 1 is Poisson, < 1 burstier (CV = 1/sqrt(burstiness))")
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 -/+ ratio)")
    p.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix workload: shared tokens")
    p.add_argument("--max-model-len", type=int, default=None, help="if the server does not say its context")
    p.add_argument("--tokenizer", default=None, help="the server model's tokenizer (default: the built-in model)")
    p.add_argument("--slo", default=None, help="e.g. ttft=500ms,tpot=100ms: adds goodput")
    p.add_argument("--max-duration", type=float, default=600.0, help="stop after this many seconds")
    p.add_argument("--seed", type=int, default=0,
                   help="arrivals, lengths and where in the corpus the prompts start (a new seed: no cached prefixes)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; e.g. 0.7 for sampled traffic")
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=cmd_bench)


def _cmd_cluster_sim(args) -> None:
    from kvloom.bench.cluster_sim import cmd_cluster_sim   # numpy/torch only when it runs
    cmd_cluster_sim(args)


def _rates(text: str) -> list[float]:
    return [float("inf") if r.strip() == "inf" else float(r) for r in text.split(",")]


def cmd_tune(args) -> None:
    from kvloom.bench.tune import format_tune, tune
    seqs = [int(x) for x in args.max_num_seqs_grid.split(",")]
    budgets = [int(x) for x in args.budget_grid.split(",")]
    result = tune(engine_config(args), args.num_requests, args.input_len, args.output_len, seqs, budgets, args.max_tpot_ms)
    print(format_tune(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def cmd_eval(args) -> None:
    from kvloom.engine.engine import Engine
    from kvloom.eval.perplexity import perplexity
    engine = Engine(engine_config(args))
    result = {**perplexity(engine, args.num_tokens, args.window, args.chunk), "model": engine.source.name,
              "quantization": engine.config.quantization, "kv_cache_dtype": engine.config.kv_cache_dtype,
              "dtype": args.dtype}   # what ran: the engine's, with auto resolved
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvloom", description="LLM inference serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a reply to one prompt, streamed")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_engine_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat, streamed")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(s, model_positional=True)
    s.add_argument("--model", dest="models", action="append", default=[], type=_lora_module, metavar="NAME=PATH",
                   help="serve several models (repeat; the first is the default; PATH 'default' is the built-in "
                        "model); requests pick one by name, or 'auto' / a --route name lets a router choose")
    s.add_argument("--max-loaded-models", type=int, default=0,
                   help="with several --model: at most this many loaded at once, others loaded on demand and the "
                        "least recently used idle one unloaded (0: all)")
    s.add_argument("--model-idle-seconds", type=float, default=0.0,
                   help="with several --model: unload a model after this many seconds without a request (0: never)")
    s.add_argument("--route", action="append", default=[], metavar="NAME=POLICY",
                   help="a routing policy clients name as their model: NAME=bandit[,lambda=0.2,...] or "
                        "NAME=cascade[,small=A,big=B,threshold=-0.5] (kvloom/router/routes.py); 'auto' is the first")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", default=None,
                   help="require this bearer key on every route but /health (repeat: one key per tenant)")
    s.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    _add_limit_args(s)
    s.add_argument("--served-model-name", default=None, help="the model name clients use (default: from the path)")
    s.add_argument("--max-waiting-requests", type=int, default=256,
                   help="past this many queued requests, answer 503 with Retry-After")
    s.add_argument("--graceful-shutdown", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM/SIGINT")
    s.add_argument("--instances", type=int, default=1,
                   help="engine instances on Ray behind one global scheduler (kvloom/cluster; starts a local Ray); "
                        "with several --model, each model gets its own instances and scheduler")
    s.add_argument("--dispatch", default="llumnix", choices=["llumnix", "least-loaded", "power-of-two", "round-robin"],
                   help="with --instances > 1: where new requests go")
    s.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto': the one `ray start` runs here; 'local': start one, even for 1 instance)")
    s.add_argument("--threads-per-instance", type=int, default=None,
                   help="torch threads (and Ray CPUs) of each engine instance (default: --num-threads, else 1)")
    s.add_argument("--placement", default="SPREAD", choices=["SPREAD", "PACK", "STRICT_SPREAD"],
                   help="Ray placement of the instances: SPREAD puts one per node where the cluster has nodes")
    s.add_argument("--no-migration", action="store_true",
                   help="dispatch only: never live-migrate running requests between instances")
    s.add_argument("--tool-call-parser", default=None,
                   choices=["hermes", "qwen", "qwen2_5", "qwen3", "smollm", "llama3_json", "llama"],
                   help="how the model writes tool calls (default: from its chat template; kvloom/structured)")
    s.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="split <think>...</think> into reasoning_content")
    s.set_defaults(func=cmd_serve, tpot_target_ms=100.0)   # a server keeps its streams' pace (engine/tpot_target.py)

    tu = sub.add_parser("tune", help="sweep max_num_seqs x max_num_batched_tokens on this machine; print the best")
    tu.add_argument("--num-requests", type=int, default=64, help="requests arriving at once")
    tu.add_argument("--input-len", type=int, default=100)
    tu.add_argument("--output-len", type=int, default=64)
    tu.add_argument("--max-num-seqs-grid", default="16,24,32,64")
    tu.add_argument("--budget-grid", default="128,256,512")
    tu.add_argument("--max-tpot-ms", type=float, default=None, help="only settings whose TPOT p99 meets this")
    tu.add_argument("--out", default=None)
    add_engine_args(tu)
    tu.set_defaults(func=cmd_tune)

    ev = sub.add_parser("eval", help="quality evaluation")
    esub = ev.add_subparsers(dest="eval", required=True)
    ppl = esub.add_parser("perplexity", help="perplexity on English text shipped with Python (pydoc topics)")
    ppl.add_argument("--num-tokens", type=int, default=4096)
    ppl.add_argument("--window", type=int, default=512)
    ppl.add_argument("--chunk", type=int, default=None,
                     help="tokens per forward pass within a window (default: the block size, so the KV is read back)")
    ppl.add_argument("--out", default=None)
    add_engine_args(ppl)
    ppl.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    lat = bsub.add_parser("latency", help="batch-1 prefill and decode speed")
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--iters", type=int, default=3)
    thr = bsub.add_parser("throughput", help="offline throughput of many prompts at once")
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--input-len", type=int, default=100)
    thr.add_argument("--output-len", type=int, default=128)
    peers = bsub.add_parser("peers", help="the same prompts through transformers, llama.cpp and other servers")
    peers.add_argument("--num-prompts", type=int, default=32)
    peers.add_argument("--input-len", type=int, default=100)
    peers.add_argument("--output-len", type=int, default=128)
    peers.add_argument("--hf-batch1-prompts", type=int, default=2, help="prompts for the slow batch-1 baseline")
    peers.add_argument("--serve-url", action="append", default=[],
                       help="OpenAI-compatible servers: the first is kvloom's, the rest peers (e.g. llama-server)")
    peers.add_argument("--serve-requests", type=int, default=64)
    peers.add_argument("--slo", default="ttft=2s,tpot=100ms")
    peers.add_argument("--max-duration", type=float, default=900.0)
    sp = bsub.add_parser("spec", help="decode speed with and without lookahead speculation, same run")
    sp.add_argument("--workload", default="repetitive", choices=["repetitive", "poisson"],
                    help="repetitive: outputs copy input spans; poisson: corpus passages to continue")
    sp.add_argument("--num-requests", type=int, default=8)
    sp.add_argument("--concurrency", type=int, default=1)
    sp.add_argument("--input-len", type=int, default=200, help="poisson workload prompt length")
    sp.add_argument("--output-len", type=int, default=128)
    sp.add_argument("--rounds", type=int, default=2,
                    help="rounds of new prompts, both engines each, alternating who goes first; summed")
    sp.add_argument("--out", default=None)
    add_engine_args(sp)
    sp.set_defaults(func=cmd_bench)

    st = bsub.add_parser("structured", help="TPOT of JSON-schema-constrained vs plain requests, same run; TTFT "
                                           "with grammar compilation; --libraries: grammar libraries compared")
    st.add_argument("--batch-sizes", default="1,32")
    st.add_argument("--input-len", type=int, default=64)
    st.add_argument("--output-len", type=int, default=64)
    st.add_argument("--rounds", type=int, default=2, help="runs of each kind per batch size, alternating; the best counts")
    st.add_argument("--libraries", action="store_true", help="only compare llguidance and xgrammar (if installed)")
    st.add_argument("--num-requests", type=int, default=8, help="with --serve-url: requests per run")
    st.add_argument("--serve-url", action="append", default=[],
                    help="OpenAI-compatible servers to compare on JSON-schema chat requests (e.g. kvloom's, llama-server)")
    st.add_argument("--out", default=None)
    add_engine_args(st)
    st.set_defaults(func=cmd_bench)

    pre = bsub.add_parser("prefix", help="TTFT with prefix caching off / on / with agent sessions")
    pre.add_argument("--prefix-len", type=int, default=1000, help="shared system prompt / first turn tokens")
    pre.add_argument("--suffix-len", type=int, default=50)
    pre.add_argument("--num-requests", type=int, default=8)
    pre.add_argument("--output-len", type=int, default=16)
    pre.add_argument("--agents", type=int, default=2)
    pre.add_argument("--turns", type=int, default=3)
    pre.add_argument("--tool-len", type=int, default=50)
    pre.add_argument("--traffic-per-turn", type=int, default=2)
    pre.add_argument("--traffic-len", type=int, default=400)
    for p in (lat, thr, peers, pre):
        add_engine_args(p)
        p.add_argument("--out", default=None, help="also write the JSON result here")
        p.set_defaults(func=cmd_bench)
    moe = bsub.add_parser("moe", help="one mixture-of-experts layer for a step of decodes: tokens grouped by "
                          "expert vs each token through its own experts, same run")
    moe.add_argument("--hidden", type=int, default=1024)
    moe.add_argument("--intermediate", type=int, default=1408, help="one expert's intermediate size")
    moe.add_argument("--experts", type=int, default=16)
    moe.add_argument("--top-k", type=int, default=2)
    moe.add_argument("--batch-sizes", default="1,4,16,64", help="decodes in the step")
    moe.add_argument("--repeats", type=int, default=20, help="runs per side, alternating; the median counts")
    moe.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    moe.add_argument("--out", default=None)
    moe.set_defaults(func=cmd_bench)
    sc = bsub.add_parser("scaling", help="inference-time scaling on a checkable task set: coverage and vote "
                                         "accuracy against N and time, adaptive sampling, shared-prompt cost")
    sc.add_argument("--items", type=int, default=120, help="tasks (kvloom/eval/tasks.py)")
    sc.add_argument("--task-seed", type=int, default=0)
    sc.add_argument("--max-n", type=int, default=64, help="samples per query; runs at N = 1, 4, 16, ... up to it")
    sc.add_argument("--temperature", type=float, default=0.8)
    sc.add_argument("--max-tokens", type=int, default=16)
    sc.add_argument("--confidences", default="0.8,0.95", help="adaptive sampling's stopping posteriors")
    sc.add_argument("--share-prompt-len", type=int, default=500)
    sc.add_argument("--share-n", type=int, default=16)
    sc.add_argument("--share-output-len", type=int, default=32)
    sc.add_argument("--repeats", type=int, default=3, help="alternated repeats of the sharing comparison")
    sc.add_argument("--parts", default="accuracy,adaptive,sharing", help="which of the three to run")
    sc.add_argument("--out", default=None, help="also write the JSON result here")
    sc.add_argument("--plot", default=None, help="a PNG of accuracy and coverage against N and wall time")
    add_engine_args(sc)
    sc.set_defaults(func=cmd_bench)
    mig = bsub.add_parser("migration", help="live-migration stall against context length: KV, pre-copy, recompute")
    mig.add_argument("--contexts", default="128,256,512,1024,2048")
    mig.add_argument("--repeats", type=int, default=3)
    mig.add_argument("--out", default=None, help="also write the JSON result here")
    add_engine_args(mig)
    mig.set_defaults(func=cmd_bench)
    srv = bsub.add_parser("serve", help="load an OpenAI-compatible server with a workload")
    _add_serve_bench_args(srv)
    srv.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    srv.add_argument("--max-concurrency", type=int, default=None,
                     help="at most this many requests in flight (1: one at a time, e.g. for cold TTFT)")
    srv.add_argument("--out", default=None, help="JSON result (and a timeline PNG beside it)")
    srv.add_argument("--save-requests", action="store_true", help="keep every request's timings in the JSON")
    from kvloom.bench.soak import add_soak_args
    so = bsub.add_parser("soak", help="a long mixed load (bursts, hang-ups, aborts) against a server it starts on "
                                      "loopback, then every request, counter, block, byte and thread accounted for")
    add_soak_args(so)
    so.set_defaults(func=cmd_bench)
    from kvloom.bench.fuzz import add_fuzz_args
    fz = bsub.add_parser("fuzz", help="schemathesis against the server's own OpenAPI document: no 5xx, no hang, "
                                      "then still serving with no KV block held")
    add_fuzz_args(fz)
    fz.set_defaults(func=cmd_bench)
    swp = bsub.add_parser("sweep", help="latency-throughput curves: a workload at several rates, per server")
    _add_serve_bench_args(swp)
    swp.add_argument("--rates", type=_rates, default=_rates("0.5,1,2,4,8,inf"))
    swp.add_argument("--out", default="results", help="directory for sweep.json and curve.png")
    cs = bsub.add_parser("cluster-sim", help="simulate 4-64 instances: real schedulers and global scheduler, "
                                             "modelled step times (kvloom/bench/cluster_sim.py)")
    cs.add_argument("--trace", default="burstgpt,azure-conv",
                    help="comma-separated trace names (burstgpt, azure-conv, azure-code) or CSV paths")
    cs.add_argument("--instances", default="4,8,16,32,64", help="instance counts to sweep")
    cs.add_argument("--policies", default="round-robin,least-loaded,power-of-two,llumnix")
    cs.add_argument("--requests-per-instance", type=int, default=40,
                    help="the trace's first N x this many rows are replayed (repeated when it is shorter)")
    cs.add_argument("--rate-per-instance", type=float, default=None, help="requests/s per instance (default: per trace)")
    cs.add_argument("--step-cost", default=None, help="JSON of StepCost fields (default: docs/performance.md's numbers)")
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--out-dir", default="docs/results", help="cluster-sim-<trace>.json and .png go here")
    cs.add_argument("--doc", default="docs/cluster-sim.md",
                    help="rewrite the table between <!-- cluster-sim:<trace> --> markers in this file")
    cs.add_argument("--validate", action="store_true",
                    help="instead: one real engine against one simulated instance on a small BurstGPT slice")
    cs.set_defaults(func=_cmd_cluster_sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per benchmark request is noise
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KvloomError as e:
        print(f"kvloom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
