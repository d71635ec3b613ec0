#!/usr/bin/env bash
# Builds llama.cpp's shared libraries (libllama + ggml) from one pinned source
# into native/build/bin, where the engine finds them. See --help.
set -euo pipefail

PIN_VERSION=0.3.36                 # llama-cpp-python sdist that vendors llama.cpp 0c1e570
PIN_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD_DIR=${SENTIRIC_BUILD_DIR:-$ROOT/native/build}
CACHE_DIR=${SENTIRIC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sentiric-llama}
START=$(date +%s)

usage() {
  cat <<USAGE
Usage: ./build_llama.sh [options] [-- extra CMake flags]

Builds libllama and the ggml libraries into native/build/bin (the engine's
default; SENTIRIC_LLAMA_LIB=/path/libllama.so points it elsewhere).

Source: llama.cpp 0c1e570 as vendored in the PyPI sdist llama-cpp-python==$PIN_VERSION
(downloaded once with pip, sha256 checked, cached in $CACHE_DIR).
LLAMA_CPP_SRC=/path/to/llama.cpp builds a local checkout instead.

Options:
  --portable          generic CPU build (GGML_NATIVE=OFF) instead of tuned for this CPU
  --cuda              NVIDIA GPUs (GGML_CUDA=ON); needs the CUDA toolkit (nvcc, cuBLAS)
  --cuda-from-pip     --cuda with NVIDIA's CUDA 13 toolkit from PyPI wheels instead, installed
                      once into $CACHE_DIR/cuda-13.0 (~570 MB download); no system CUDA needed
  --cuda-root DIR     --cuda with the toolkit at DIR, laid out as the wheels are (bin/nvcc, lib/)
  --cuda-arch LIST    CUDA architectures, e.g. 90 or "80;86;90" (default: the GPUs of this
                      machine; needed where there is none)
  --server            also build llama-server and llama-batched-bench (the benchmark reference);
                      added to an existing build without touching libllama, and kept by later builds
  --jobs N            parallel compile jobs (default: number of cores)
  --configure-only    stop after CMake's configure step (compiles nothing)
  --clean             throw the build directory away first
  -h, --help          this text
  -- FLAGS...         passed to CMake unchanged, for other hardware, e.g.
                      -- -DGGML_VULKAN=ON | -DGGML_HIP=ON | -DGGML_METAL=ON
                      -- -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS

One build directory whose contents only grow: re-running with the same source
and options does nothing (a stamp file records them); new options reconfigure
the same directory and CMake recompiles what they change; a new source starts
from a clean directory.
USAGE
}

say() { printf '[build_llama %3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf 'build_llama: error: %s\n' "$*" >&2; exit 1; }

FLAGS=(-DGGML_NATIVE=ON)
CUDA=""                            # system | pip | a toolkit directory
SERVER=OFF
JOBS=$(nproc 2>/dev/null || echo 2)
CLEAN=0
CONFIGURE_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --portable) FLAGS+=(-DGGML_NATIVE=OFF) ;;
    --cuda) CUDA=system ;;
    --cuda-from-pip) CUDA=pip ;;
    --cuda-root) [ $# -ge 2 ] || die "--cuda-root needs a directory"; CUDA=$(cd "$2" && pwd) || die "no directory $2"; shift ;;
    --cuda-arch) [ $# -ge 2 ] || die "--cuda-arch needs a value"; FLAGS+=("-DCMAKE_CUDA_ARCHITECTURES=$2"); shift ;;
    --server) SERVER=ON ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a value"; JOBS=$2; shift ;;
    --clean) CLEAN=1 ;;
    --configure-only) CONFIGURE_ONLY=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; FLAGS+=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

command -v cmake >/dev/null || die "cmake not found: install it (apt-get install cmake, or pip install cmake)"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler found: install g++ (apt-get install build-essential)"
case "$CUDA" in
  "") ;;
  system)
    command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] \
      || die "--cuda needs nvcc (the CUDA toolkit); none found (--cuda-from-pip installs one from PyPI)"
    export PATH="$PATH:/usr/local/cuda/bin"
    FLAGS+=(-DGGML_CUDA=ON) ;;
  *)
    if [ "$CUDA" = pip ]; then
      say "CUDA toolkit from PyPI wheels"
      TOOLKIT=$("$ROOT/native/cuda_wheels.sh" install "$CACHE_DIR/cuda-13.0")
    else
      "$ROOT/native/cuda_wheels.sh" bridge "$CUDA"
      TOOLKIT=$CUDA
    fi
    # both, or CMake takes a system toolkit found elsewhere for one of them
    FLAGS+=(-DGGML_CUDA=ON "-DCUDAToolkit_ROOT=$TOOLKIT" "-DCMAKE_CUDA_COMPILER=$TOOLKIT/bin/nvcc")
    # no wheel ships the driver stub libcuda.so that ggml's VMM memory pool links against
    [ -e "$TOOLKIT/lib/stubs/libcuda.so" ] || FLAGS+=(-DGGML_CUDA_NO_VMM=ON) ;;
esac

# --- source -----------------------------------------------------------------
if [ -n "${LLAMA_CPP_SRC:-}" ]; then
  SRC=$(cd "$LLAMA_CPP_SRC" && pwd) || die "LLAMA_CPP_SRC=$LLAMA_CPP_SRC does not exist"
  [ -f "$SRC/include/llama.h" ] || die "LLAMA_CPP_SRC=$SRC has no include/llama.h"
  SRC_ID="local:$SRC:$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo nogit):$( (git -C "$SRC" status --porcelain 2>/dev/null || true) | sha256sum | cut -c1-12)"
else
  SRC="$CACHE_DIR/llama.cpp-$PIN_VERSION"
  SRC_ID="pinned:$PIN_SHA256"
  if [ ! -f "$SRC/include/llama.h" ]; then
    SDIST="$CACHE_DIR/llama_cpp_python-$PIN_VERSION.tar.gz"
    mkdir -p "$CACHE_DIR"
    if [ ! -f "$SDIST" ]; then
      say "downloading the llama-cpp-python $PIN_VERSION sdist (llama.cpp source) with pip"
      TMP=$(mktemp -d)
      python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$PIN_VERSION" -d "$TMP" >/dev/null 2>"$TMP/pip.log" \
        || { cat "$TMP/pip.log" >&2; die "pip could not download llama-cpp-python==$PIN_VERSION (no network to PyPI?)"; }
      mv "$TMP/llama_cpp_python-$PIN_VERSION.tar.gz" "$SDIST"
      rm -rf "$TMP"
    fi
    say "checking sha256 of $(basename "$SDIST")"
    GOT=$(sha256sum "$SDIST" | cut -d' ' -f1)
    [ "$GOT" = "$PIN_SHA256" ] || { rm -f "$SDIST"; die "bad checksum for $SDIST: got $GOT, want $PIN_SHA256 (file removed; run again)"; }
    say "extracting vendor/llama.cpp"
    TMP=$(mktemp -d)
    tar -xzf "$SDIST" -C "$TMP" "llama_cpp_python-$PIN_VERSION/vendor/llama.cpp"
    rm -rf "$SRC"
    mv "$TMP/llama_cpp_python-$PIN_VERSION/vendor/llama.cpp" "$SRC"
    rm -rf "$TMP"
  fi
fi

# --- build ------------------------------------------------------------------
# The stamp holds the source on its first line, the CMake flags configured on its
# second and, once they compiled, "compiled" on its third.
# The reference tools are always configured (configuring compiles nothing) and
# only compiled on request, so adding them never touches libllama; once built,
# later builds keep them and keep them up to date.
STAMP="$BUILD_DIR/bin/.build-stamp"
BIN="$BUILD_DIR/bin"
TARGETS=(llama abi_probe)
OUTPUTS=("$BIN/libllama.so" "$BIN/abi_probe")
if [ "$SERVER" = ON ]; then
  OUTPUTS+=("$BIN/llama-server" "$BIN/llama-batched-bench")
fi
if [ "$SERVER" = ON ] || [ -e "$BIN/llama-server" ]; then  # tools once built are kept up to date
  TARGETS+=(llama-server llama-batched-bench)
fi
OLD_SRC=""; OLD_FLAGS=""; COMPILED=""
if [ -f "$STAMP" ]; then
  OLD_SRC=$(sed -n 1p "$STAMP"); OLD_FLAGS=$(sed -n 2p "$STAMP"); COMPILED=$(sed -n 3p "$STAMP")
fi
missing() { for f in "${OUTPUTS[@]}"; do [ -e "$f" ] || return 0; done; return 1; }
if [ "$CLEAN" = 0 ] && [ "$OLD_SRC" = "$SRC_ID" ] && [ "$OLD_FLAGS" = "${FLAGS[*]}" ] \
    && { [ "$CONFIGURE_ONLY" = 1 ] || { [ "$COMPILED" = compiled ] && ! missing; }; }; then
  say "up to date: $BIN ($SRC_ID ${FLAGS[*]})"
  exit 0
fi
if [ "$CLEAN" = 1 ] || { [ -n "$OLD_SRC" ] && [ "$OLD_SRC" != "$SRC_ID" ]; } || [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  [ -d "$BUILD_DIR" ] && say "new source (or --clean): starting from a clean build directory"
  rm -rf "$BUILD_DIR"
  OLD_FLAGS=""
fi
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ] || [ "$OLD_FLAGS" != "${FLAGS[*]}" ]; then
  # a -DNAME=... given last time but not now goes back to its default
  UNSET=()
  for old in $OLD_FLAGS; do
    name=${old#-D}; name=${name%%=*}; name=${name%%:*}
    [[ " ${FLAGS[*]} " == *" -D$name="* || " ${FLAGS[*]} " == *" -D$name:"* ]] || UNSET+=("-U$name")
  done
  say "configuring: ${FLAGS[*]} ${UNSET[*]}"
  mkdir -p "$BUILD_DIR"
  cmake -S "$ROOT/native" -B "$BUILD_DIR" -DLLAMA_CPP_SRC="$SRC" "${UNSET[@]}" "${FLAGS[@]}" \
      >"$BUILD_DIR/configure.log" 2>&1 \
    || { tail -40 "$BUILD_DIR/configure.log" >&2; die "CMake configure failed (full log: $BUILD_DIR/configure.log)"; }
  mkdir -p "$BIN"
  printf '%s\n%s\n' "$SRC_ID" "${FLAGS[*]}" >"$STAMP"
fi
if [ "$CONFIGURE_ONLY" = 1 ]; then
  say "configured: $BUILD_DIR (--configure-only: nothing compiled)"
  exit 0
fi
say "compiling ${TARGETS[*]} with $JOBS jobs"
cmake --build "$BUILD_DIR" --parallel "$JOBS" --target "${TARGETS[@]}" >"$BUILD_DIR/build.log" 2>&1 \
  || { tail -40 "$BUILD_DIR/build.log" >&2; die "compile failed (full log: $BUILD_DIR/build.log)"; }
printf '%s\n%s\ncompiled\n' "$SRC_ID" "${FLAGS[*]}" >"$STAMP"
say "done: $(cd "$BIN" && ls -1 *.so* llama-* 2>/dev/null | tr '\n' ' ')"
