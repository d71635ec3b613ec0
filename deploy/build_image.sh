#!/usr/bin/env bash
# Builds the CPU image (deploy/Dockerfile) with podman on a base image made here from Debian packages
# with mmdebstrap (no image registry needs to be reachable, only Debian's mirror and PyPI), runs it
# with the model from a mounted volume, asks it one chat question, stops it (SIGTERM: drain, exit 0)
# and prints the timings. Outside CI (it compiles libllama: minutes). On a shared machine run it under
# the CPU lock: flock /tmp/sentiric-cpu.lock deploy/build_image.sh
#
# Needs: podman, mmdebstrap, curl (Debian packages; runc too where crun cannot start containers).
# Environment: TAG (image), BASE (base image name), SUITE / MIRROR (Debian), PORT / GRPC_PORT (loopback),
# NEW_BASE=1 (make the base again: a new base invalidates podman's layer cache, the build starts over).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TAG=${TAG:-localhost/sentiric-llm-llama-service:cpu}
SUITE=${SUITE:-bookworm}
BASE=${BASE:-localhost/sentiric-debian:$SUITE}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-16170}
GRPC_PORT=${GRPC_PORT:-16171}
NAME=sentiric-llama-image-check-$$
WORK=$(mktemp -d)
START=$(date +%s)
say() { printf '[build_image %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { printf 'build_image: error: %s\n' "$*" >&2; exit 1; }
cleanup() {
  podman rm -f "$NAME" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for tool in podman mmdebstrap curl python3; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install podman mmdebstrap curl)"
done
elapsed() { echo $(( $(date +%s) - $1 )); }

# --- 1. the base image: Debian minbase, without docs, man pages and locales (as debian:*-slim) -----
t=$(date +%s)
if [ "${NEW_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; then
  say "base image $BASE: mmdebstrap $SUITE from $MIRROR"
  mmdebstrap --quiet --variant=minbase --format=tar \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$WORK/base.tar" "$MIRROR"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$BASE" >/dev/null
else
  say "base image $BASE: kept (NEW_BASE=1 makes it again)"
fi
T_BASE=$(elapsed "$t")

# Inside a container (like this project's machines) podman's defaults may not start one: crun refuses
# a cgroup v1 hybrid layout and, without CAP_SYS_RESOURCE, podman's default ulimits cannot be set.
# Then this script uses runc and the ulimits it already has.
if ! podman run --rm --network host "$BASE" true >/dev/null 2>&1; then
  command -v runc >/dev/null || die "podman cannot start a container here and runc is not installed (apt-get install runc)"
  cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF=$WORK/containers.conf
  podman run --rm --network host "$BASE" true || die "podman cannot start a container here, even with runc"
  say "podman: runc and this shell's ulimits (the defaults cannot start a container here)"
fi

# --- 2. the image -------------------------------------------------------------------------------
# pip in the build trusts what pip here trusts (a proxy on the way to PyPI may re-sign TLS)
CA=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  CA=(--volume /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
fi
t=$(date +%s)
say "image $TAG: podman build (compiles libllama --portable)"
podman build --format docker --network host --file deploy/Dockerfile --tag "$TAG" \
  --build-arg BASE_IMAGE="$BASE" "${CA[@]}" . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; die "podman build failed"; }
T_BUILD=$(elapsed "$t")
SIZE=$(podman image inspect --format '{{.Size}}' "$TAG")

# --- 3. run it: model from a mounted volume, loopback only, the root filesystem read-only ---------
MODEL=$(python3 -c 'from engine.model_files import ensure_default_model as f; print(f(lambda m: None))')
t=$(date +%s)
say "running $TAG on 127.0.0.1:$PORT (model volume: $(dirname "$MODEL"))"
# (without systemd podman logs that it cannot start the HEALTHCHECK's timer: harmless, it is run once below)
podman run --detach --name "$NAME" --network host --read-only \
  --volume "$(dirname "$MODEL"):/models:ro" \
  --env LLM_LLAMA_SERVICE_LISTEN_ADDRESS=127.0.0.1 --env LLM_LLAMA_SERVICE_HTTP_PORT="$PORT" \
  --env LLM_LLAMA_SERVICE_GRPC_PORT="$GRPC_PORT" --env LLM_LLAMA_SERVICE_DRAIN_TIMEOUT=20 \
  "$TAG" >/dev/null
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || { podman logs "$NAME" >&2; die "the container exited"; }
  sleep 0.2
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { podman logs "$NAME" >&2; die "not ready after 120 s"; }
T_READY=$(elapsed "$t")
podman healthcheck run "$NAME" || die "the image's HEALTHCHECK failed on a ready service"
USER_ID=$(podman exec "$NAME" id -u)

t0=$(date +%s%N)
ANSWER=$(curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is the capital of Germany?"}], "max_tokens": 32, "temperature": 0}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])')
T_CHAT_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
t=$(date +%s)
podman stop --time 30 "$NAME" >/dev/null
T_STOP=$(elapsed "$t")
EXIT=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")

echo
echo "image       $TAG ($(( SIZE / 1000000 )) MB), runs as uid $USER_ID"
echo "answer      $ANSWER"
echo "timings     base image ${T_BASE} s (mmdebstrap + import), image build ${T_BUILD} s, start to ready ${T_READY} s,"
echo "            chat request ${T_CHAT_MS} ms, stop (SIGTERM, drain) ${T_STOP} s, exit code $EXIT"
[[ "$ANSWER" == *Berlin* ]] || die "the answer does not name Berlin"
[ "$EXIT" = 0 ] || die "the service exited with $EXIT on SIGTERM"
