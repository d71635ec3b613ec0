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
  --cuda              NVIDIA GPUs (GGML_CUDA=ON); needs nvcc
  --cuda-arch LIST    CUDA architectures, e.g. 90 or "80;86;90" (default: CMake's choice)
  --server            also build llama-server and llama-batched-bench (the benchmark reference);
                      added to an existing build without touching libllama, and kept by later builds
  --jobs N            parallel compile jobs (default: number of cores)
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
SERVER=OFF
JOBS=$(nproc 2>/dev/null || echo 2)
CLEAN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --portable) FLAGS+=(-DGGML_NATIVE=OFF) ;;
    --cuda) FLAGS+=(-DGGML_CUDA=ON) ;;
    --cuda-arch) [ $# -ge 2 ] || die "--cuda-arch needs a value"; FLAGS+=("-DCMAKE_CUDA_ARCHITECTURES=$2"); shift ;;
    --server) SERVER=ON ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a value"; JOBS=$2; shift ;;
    --clean) CLEAN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; FLAGS+=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

command -v cmake >/dev/null || die "cmake not found: install it (apt-get install cmake, or pip install cmake)"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler found: install g++ (apt-get install build-essential)"
if [[ " ${FLAGS[*]} " == *" -DGGML_CUDA=ON "* ]]; then
  command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || die "--cuda needs nvcc (the CUDA toolkit); none found"
  export PATH="$PATH:/usr/local/cuda/bin"
fi

# --- source -----------------------------------------------------------------
if [ -n "${LLAMA_CPP_SRC:-}" ]; then
  SRC=$(cd "$LLAMA_CPP_SRC" && pwd) || die "LLAMA_CPP_SRC=$LLAMA_CPP_SRC does not exist"
  [ -f "$SRC/include/llama.h" ] || die "LLAMA_CPP_SRC=$SRC has no include/llama.h"
  SRC_ID="local:$SRC:$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo nogit):$(git -C "$SRC" status --porcelain 2>/dev/null | sha256sum | cut -c1-12)"
else
  SRC="$CACHE_DIR/llama.cpp-$PIN_VERSION"
  SRC_ID="pinned:$PIN_SHA256"
  if [ ! -f "$SRC/include/llama.h" ]; then
    SDIST="$CACHE_DIR/llama_cpp_python-$PIN_VERSION.tar.gz"
    mkdir -p "$CACHE_DIR"
    if [ ! -f "$SDIST" ]; then
      say "downloading the llama-cpp-python $PIN_VERSION sdist (llama.cpp source) with pip"
      TMP=$(mktemp -d)
      python3 -m pip download --quiet --no-deps --no-binary :all: \
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
# The stamp holds the source on its first line and the CMake flags on its second.
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
OLD_SRC=""; OLD_FLAGS=""
if [ -f "$STAMP" ]; then
  OLD_SRC=$(sed -n 1p "$STAMP"); OLD_FLAGS=$(sed -n 2p "$STAMP")
fi
missing() { for f in "${OUTPUTS[@]}"; do [ -e "$f" ] || return 0; done; return 1; }
if [ "$CLEAN" = 0 ] && [ "$OLD_SRC" = "$SRC_ID" ] && [ "$OLD_FLAGS" = "${FLAGS[*]}" ] && ! missing; then
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
  rm -f "$STAMP"  # until the compile below succeeds
fi
say "compiling ${TARGETS[*]} with $JOBS jobs"
cmake --build "$BUILD_DIR" --parallel "$JOBS" --target "${TARGETS[@]}" >"$BUILD_DIR/build.log" 2>&1 \
  || { tail -40 "$BUILD_DIR/build.log" >&2; die "compile failed (full log: $BUILD_DIR/build.log)"; }
printf '%s\n%s\n' "$SRC_ID" "${FLAGS[*]}" >"$STAMP"
say "done: $(cd "$BIN" && ls -1 *.so* llama-* 2>/dev/null | tr '\n' ' ')"
