#!/usr/bin/env bash
# One-step set-up on a fresh machine: Python packages, libllama, the default
# model, the studio's npm packages; with --test also the reference llama-server
# and Debian's chromium for the browser test. Safe to re-run (each step is a
# no-op when already done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TEST=0; [ "${1:-}" = "--test" ] && TEST=1
say() { printf '[setup] %s\n' "$*"; }

say "python packages"
if [ "$TEST" = 1 ]; then extras="[test,loadtest]"; else extras=""; fi
python3 -m pip install --quiet --disable-pip-version-check -e ".$extras"

say "libllama"
if [ "$TEST" = 1 ]; then ./build_llama.sh --server; else ./build_llama.sh; fi

say "default model"
python3 -c "from engine.model_files import ensure_default_model; ensure_default_model()"

if [ -f studio/package-lock.json ]; then
  say "studio packages"
  npm ci --prefix studio --no-audit --no-fund --loglevel=error >/dev/null
fi

if [ "$TEST" = 1 ]; then
  debs=()
  [ -x /usr/bin/chromium ] || debs+=(chromium)       # the studio's browser test
  command -v haproxy >/dev/null || debs+=(haproxy)  # `haproxy -c` of deploy/haproxy/haproxy.cfg (4 MB)
  if [ ${#debs[@]} -gt 0 ]; then
    say "Debian packages: ${debs[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "${debs[@]}" >/dev/null
  fi
fi
say "ready"
