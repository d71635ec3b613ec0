#!/usr/bin/env bash
# A CUDA toolkit that CMake and llama.cpp accept, made of NVIDIA's PyPI wheels
# (no system CUDA needed). build_llama.sh calls it; see its --cuda-from-pip.
#
#   native/cuda_wheels.sh install PREFIX   install the pinned CUDA 13 wheels into PREFIX once,
#                                          bridge them, print the toolkit root
#   native/cuda_wheels.sh bridge ROOT      only bridge a toolkit in the wheels' layout at ROOT
set -euo pipefail

# Measured together: nvcc, crt and nvvm must be the same release (unpinned, crt
# and nvvm resolve to a newer one that this nvcc rejects); the cu12 wheels ship no nvcc.
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
      nvidia-nvjitlink==13.0.88)

die() { printf 'cuda_wheels: error: %s\n' "$*" >&2; exit 1; }

# The gaps between the wheels and a system toolkit, closed in place.
bridge() {
  local root=$1 name versioned
  [ -x "$root/bin/nvcc" ] || die "$root/bin/nvcc not found: not a CUDA toolkit"
  # nvcc.profile adds -L$(TOP)/lib64; the wheels have lib
  [ -e "$root/lib64" ] || ln -s lib "$root/lib64"
  # CMake's FindCUDAToolkit looks for the unversioned names; the wheels ship .so.13 only
  for name in cudart cublas cublasLt; do
    [ -e "$root/lib/lib$name.so" ] && continue
    versioned=("$root/lib/lib$name.so."*)
    [ -e "${versioned[0]}" ] || die "no lib$name.so in $root/lib"
    ln -s "$(basename "${versioned[0]}")" "$root/lib/lib$name.so"
  done
  "$root/bin/nvcc" --version >/dev/null || die "$root/bin/nvcc does not run"
}

install() {
  local prefix=$1 root=$1/nvidia/cu13 tmp
  if [ "$(cat "$prefix/.pins" 2>/dev/null)" != "${PINS[*]}" ]; then
    printf 'cuda_wheels: installing %s into %s (~570 MB download, ~930 MB on disk)\n' "${PINS[*]}" "$prefix" >&2
    tmp="$prefix.partial"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    python3 -m pip install --disable-pip-version-check --no-deps --only-binary :all: \
        --target "$tmp" "${PINS[@]}" >"$tmp.log" 2>&1 \
      || { tail -20 "$tmp.log" >&2; die "pip could not install the CUDA wheels (no network to PyPI?); log: $tmp.log"; }
    rm -f "$tmp.log"
    printf '%s\n' "${PINS[*]}" >"$tmp/.pins"
    rm -rf "$prefix"
    mv "$tmp" "$prefix"
  fi
  bridge "$root"
  printf '%s\n' "$root"
}

case "${1:-}:${2:-}" in
  install:?*) install "$2" ;;
  bridge:?*) bridge "$2" ;;
  *) die "usage: $0 install PREFIX | bridge ROOT" ;;
esac
