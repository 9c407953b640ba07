# Sourced by the side-by-side benchmark scripts: start a fresh kvloom or llama-server on $GGUF at $PORT
# ($LLAMA: llama.cpp's bin folder) and wait until it answers; the caller kills "$server" when done.
# cap_class: a run's CPU class and the flags it ran with.
# Issue 14's serving burst: 48 requests of ~100 tokens in and 128 out, all at once, against the TPOT SLO.
BURST=(--workload poisson --request-rate inf --num-requests 48 --input-len 100 --output-len 128 --slo ttft=2s,tpot=100ms)
wait_for() { for _ in $(seq 900); do curl -sf "$1" > /dev/null && return 0; sleep 1; done; return 1; }

start_server() {  # $1: kvloom | llama, $2: log file, $3: llama-server's context (tokens over its 16 slots)
  if [ "$1" = kvloom ]; then   # $KVLOOM_SERVE_FLAGS: more flags for kvloom serve (default: none)
    # shellcheck disable=SC2086
    kvloom serve "$GGUF" --port "$PORT" ${KVLOOM_SERVE_FLAGS:-} > "$2" 2>&1 &
  else
    "$LLAMA/llama-server" -m "$GGUF" -t 2 -np 16 -c "$3" --port "$PORT" > "$2" 2>&1 &
  fi
  server=$!
  wait_for "http://127.0.0.1:$PORT/health"
}

cap_class() {  # $1: native | avx2 (kvloom's kernels, PyTorch and oneDNN capped at AVX2), $2: OUT for cpu_flags.txt
  if [ "$1" = avx2 ]; then
    export KVLOOM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2
  fi
  export HF_HUB_OFFLINE=1
  grep -o 'avx512[a-z_]*\|avx2\|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ' > "$2/cpu_flags.txt"
}
