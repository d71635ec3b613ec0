#!/usr/bin/env bash
# The GPU path, proven on a machine with an NVIDIA GPU in one run (sized for under 8 minutes on
# an H200 with 16 cores): builds libllama and llama.cpp's tools for the GPU found and a CPU
# reference from the same source, checks that greedy answers agree, then runs bench_engine.py
# (against llama-batched-bench) and bench_serving.py (against llama-server) on the GPU build, and,
# given a draft model (GPU_CHECK_DRAFT_MODEL: a GGUF of the model's vocabulary, or layers:N for the
# model's first N layers), bench_speculative.py's draft-model runs: the service with --model-draft
# next to --spec-type none, and llama-server -md with the same pair.
#
#   loadtest/gpu_check.sh [--builds-only] [RESULTS_DIR]
#       results (7 files, 9 with a draft model) go to RESULTS_DIR, else $OUT, else loadtest/results/gpu; builds and logs
#       to $GPU_CHECK_WORK (default /tmp/sentiric-gpu-check), where a later run finds them up to
#       date. --builds-only stops after the builds and needs no model: a lease whose transfers
#       cannot carry the model with the source builds in one call and checks in the next.
#
# The CUDA toolkit, in this order: a system one whose nvcc has cuBLAS beside it (--cuda); nvcc
# without cuBLAS (e.g. a /usr/local/cuda made of NVIDIA's wheels) plus the nvidia-cublas wheel
# in python3's site-packages, copied into one toolkit (--cuda-root); else --cuda-from-pip (PyPI).
#
# On a machine that reaches no network, bring along: the llama.cpp source (LLAMA_CPP_SRC, or
# build_llama.sh's sdist in $SENTIRIC_CACHE_DIR), the model (GPU_CHECK_MODEL, default: the
# project's default model in $SENTIRIC_CACHE_DIR) and the Python packages of pyproject.toml that
# python3 lacks (PYTHONPATH). The script checks all three before it builds anything.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILDS_ONLY=0
[ "${1:-}" = --builds-only ] && { BUILDS_ONLY=1; shift; }
RESULTS=${1:-${OUT:-$ROOT/loadtest/results/gpu}}
WORK=${GPU_CHECK_WORK:-/tmp/sentiric-gpu-check}
PY=${PYTHON:-python3}
JOBS=${GPU_CHECK_JOBS:-$(nproc)}   # compile jobs (fewer, if a loaded build machine stops answering)
THREADS=8                        # every layer is on the GPU: CPU threads only feed it
PROMPTS=("What is the capital of Germany?" "Name the three primary colours."
         "Write one sentence about the sea." "What is 12 times 12?")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$RESULTS" "$WORK"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
START=$(date +%s)
FAILED=()

say() { printf '[gpu_check %3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { say "error: $*"; exit 1; }
fail() { say "FAILED: $*"; FAILED+=("$*"); }
summary() { printf '%s\n' "$@" >>"$RESULTS/summary.md"; }

# --- what must be here --------------------------------------------------------
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA GPU or driver"
MODEL=${GPU_CHECK_MODEL:-$("$PY" -c 'from engine.model_files import default_model_path; print(default_model_path())')}
[ -f "$MODEL" ] || [ "$BUILDS_ONLY" = 1 ] || die "no model at $MODEL (set GPU_CHECK_MODEL)"
# the imports of pyproject.toml's dependencies; the generated gRPC module checks the protobuf runtime
"$PY" -c 'import numpy, aiohttp, orjson, jinja2, prometheus_client, grpc, grpc_health.v1.health
import grpc_reflection.v1alpha.reflection, server.proto.llama_pb2' \
  || die "$PY lacks Python packages of pyproject.toml (above); bring them as wheels on PYTHONPATH"
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d '. ' | sort -u | sed 's/$/-real/' | paste -sd ';')
say "GPU: $GPU; CUDA architectures $ARCH; $JOBS cores; model $MODEL"

# --- the CUDA toolkit -------------------------------------------------------
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ -x "$NVCC" ]; then
  # where nvcc itself runs from (the one on PATH may be a wrapper script)
  NVCC_ROOT=$(cd "$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)/.." && pwd)
  say "nvcc: $NVCC in $NVCC_ROOT ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
fi
CU13=$("$PY" -c 'import importlib.util as u
try: print(next(iter(u.find_spec("nvidia.cu13").submodule_search_locations)))
except Exception: pass')
if [ -x "$NVCC" ] && compgen -G "$NVCC_ROOT/lib*/libcublas.so*" >/dev/null; then
  CUDA_OPT=(--cuda); TOOLKIT="system toolkit $NVCC_ROOT"
  PATH="$(dirname "$NVCC"):$PATH"
elif [ -x "$NVCC" ] && [ -n "$CU13" ] && compgen -G "$CU13/lib/libcublas.so*" >/dev/null; then
  # a copy, so that build_llama.sh can bridge it without touching the system's files
  TK="$WORK/cuda-toolkit"
  if [ ! -x "$TK/bin/nvcc" ]; then  # made once: a rerun's build then finds its toolkit unchanged
    rm -rf "$TK.partial" && mkdir -p "$TK.partial"
    cp -a "$NVCC_ROOT/." "$TK.partial/"
    cp -a "$CU13"/lib/libcublas* "$TK.partial/lib/"
    cp -a "$CU13"/include/cublas* "$TK.partial/include/"
    mv "$TK.partial" "$TK"
  fi
  CUDA_OPT=(--cuda-root "$TK"); TOOLKIT="nvcc of $NVCC_ROOT + cuBLAS of $CU13, copied into $TK"
else
  CUDA_OPT=(--cuda-from-pip); TOOLKIT="NVIDIA's wheels from PyPI"
fi
say "toolkit: $TOOLKIT"

# --- builds -------------------------------------------------------------------
build() {  # NAME FLAGS...: one build directory per build under $WORK
  local name=$1 t0; shift
  t0=$(date +%s)
  SENTIRIC_BUILD_DIR="$WORK/build-$name" "$ROOT/build_llama.sh" --jobs "$JOBS" "$@" \
    || die "the $name build failed (log in $WORK/build-$name)"
  say "$name build: $(( $(date +%s) - t0 )) s"
  summary "- $name build (\`build_llama.sh $*\`, $JOBS jobs): $(( $(date +%s) - t0 )) s"
}
: >"$RESULTS/summary.md"
summary "# GPU check, $(date -u '+%F %H:%M UTC')" "" "- GPU: $GPU, architectures $ARCH, $JOBS cores" \
        "- toolkit: $TOOLKIT" "- model: $MODEL"
build cpu
build cuda "${CUDA_OPT[@]}" --cuda-arch "$ARCH" --server
CUDA_BIN="$WORK/build-cuda/bin"
summary "- libggml-cuda.so: $(du -Lh "$CUDA_BIN/libggml-cuda.so" | cut -f1)"
# the engine's own choice with this build: every layer on the GPU, bigger prefill chunks
SENTIRIC_LLAMA_LIB="$CUDA_BIN/libllama.so" "$PY" -c '
from engine.config import EngineConfig
from engine.llama import system_info
c = EngineConfig(model_path="-")
print("engine on this build: gpu", c.gpu, "batch", c.batch_size, "|", system_info())
assert c.gpu and c.batch_size == 1024, "the engine does not offload with this build"' \
  || fail "the CUDA build does not offload"
if [ "$BUILDS_ONLY" = 1 ]; then
  say "builds done (--builds-only) in $(( $(date +%s) - START )) s"
  [ ${#FAILED[@]} -eq 0 ] || die "failed: ${FAILED[*]}"
  exit 0
fi

# --- greedy answers: GPU against CPU ----------------------------------------------
say "greedy answers, CPU build against CUDA build"
for name in cpu cuda; do
  for i in "${!PROMPTS[@]}"; do
    SENTIRIC_LLAMA_LIB="$WORK/build-$name/bin/libllama.so" "$PY" -m server.cli generate "${PROMPTS[$i]}" \
      --model "$MODEL" --max-tokens 48 >"$WORK/answer-$i-$name.txt" || fail "generate on the $name build"
  done
done
# the same answer, or the same opening (GPU kernels round differently, and a near tie can flip later)
"$PY" - "$WORK" "${#PROMPTS[@]}" >"$RESULTS/greedy.txt" <<'PY' || fail "greedy answers differ (greedy.txt)"
import os, sys
work, n = sys.argv[1], int(sys.argv[2])
worst = None
for i in range(n):
    cpu, gpu = (open(os.path.join(work, f"answer-{i}-{b}.txt")).read().strip() for b in ("cpu", "cuda"))
    same = next((k for k, (a, b) in enumerate(zip(cpu, gpu)) if a != b), min(len(cpu), len(gpu)))
    verdict = "identical" if cpu == gpu else f"same for the first {same} characters"
    worst = same if cpu != gpu and (worst is None or same < worst) else worst
    print(f"## prompt {i}: {verdict}\nCPU : {cpu!r}\nCUDA: {gpu!r}\n")
print("verdict:", "all identical" if worst is None else f"diverging answers agree for at least {worst} characters")
sys.exit(0 if worst is None or worst >= 24 else 1)
PY
cat "$RESULTS/greedy.txt"
summary "- greedy answers: $(tail -1 "$RESULTS/greedy.txt")"

# --- benchmarks on the CUDA build -----------------------------------------------
export SENTIRIC_LLAMA_LIB="$CUDA_BIN/libllama.so"
say "bench_engine: the engine against llama-batched-bench"
"$PY" "$ROOT/loadtest/bench_engine.py" --model "$MODEL" --bench-bin "$CUDA_BIN/llama-batched-bench" \
    --levels 1,4,16 --repeats 1 --threads "$THREADS" --quiet-wait 5 --retries 1 \
    --json "$RESULTS/bench_engine.json" 2>&1 | tee "$RESULTS/bench_engine.txt" || fail "bench_engine"
say "bench_serving: the service against llama-server"
"$PY" "$ROOT/loadtest/bench_serving.py" --start-service --compare llama-server \
    --llama-server-bin "$CUDA_BIN/llama-server" --model "$MODEL" --threads "$THREADS" \
    --concurrency 1,4,16 --requests 16 --log-dir "$WORK/logs" --markdown \
    --json "$RESULTS/bench_serving.json" 2>&1 | tee "$RESULTS/bench_serving.txt" || fail "bench_serving"
grep -h -m1 "engine  *CUDA" "$WORK"/logs/sentiric-*.log || fail "the service did not run on CUDA"
grep -h -m1 "offloaded .* layers to GPU" "$WORK"/logs/llama-server-*.log || fail "llama-server did not offload"
DRAFT=${GPU_CHECK_DRAFT_MODEL:-}
if [ -n "$DRAFT" ] && { [ -f "$DRAFT" ] || [[ $DRAFT == layers:* ]]; }; then
  say "bench_speculative: a draft model ($DRAFT), the service and llama-server -md, next to no drafting"
  "$PY" "$ROOT/loadtest/bench_speculative.py" --model "$MODEL" --draft-model "$DRAFT" --threads "$THREADS" \
      --llama-server "$CUDA_BIN/llama-server" --spec-types none --llama-modes "" --chat-levels "" --rounds 2 \
      --log-dir "$WORK/logs-draft" --out "$RESULTS/bench_draft.json" 2>&1 | tee "$RESULTS/bench_draft.txt" \
    || fail "bench_speculative with a draft model"
  summary "- draft model $DRAFT: $RESULTS/bench_draft.json"
else
  say "no draft model (GPU_CHECK_DRAFT_MODEL unset or not a file): its runs are skipped"
  summary "- draft model: not run (set GPU_CHECK_DRAFT_MODEL to a GGUF of the model's vocabulary, or layers:N)"
fi

summary "- total: $(( $(date +%s) - START )) s" "" "## bench_engine" "" "$(grep '^|' "$RESULTS/bench_engine.txt")" \
        "" "## bench_serving" "" "$(grep '^|' "$RESULTS/bench_serving.txt")"
say "done in $(( $(date +%s) - START )) s; results in $RESULTS"
[ ${#FAILED[@]} -eq 0 ] || die "failed: ${FAILED[*]}"
