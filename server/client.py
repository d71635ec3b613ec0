"""`sentiric-llama client`: the operator's gRPC client, as the platform's
gateway calls the service.

    sentiric-llama client generate "What is the capital of Germany?"   # streams the answer
    sentiric-llama client health                                       # exit 0 when SERVING
    sentiric-llama client wait-for-ready --timeout 120                  # an init container's check

TLS files default to the service's own environment variables, so a container
beside the service (or an init container) reuses its certificate for mTLS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.proto import llama_pb2, llama_pb2_grpc

SERVICE = llama_pb2.DESCRIPTOR.services_by_name["LlamaService"].full_name


def open_channel(target: str, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
                 server_name: str | None = None) -> grpc.Channel:
    """A plaintext channel, or TLS when a CA is given (mutual TLS with a client cert and key)."""
    if not ca:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def _metadata(args) -> list[tuple[str, str]]:
    return [(k, v) for k, v in (("x-tenant-id", args.tenant), ("x-trace-id", args.trace)) if v]


def generate(args, channel: grpc.Channel) -> int:
    params = llama_pb2.GenerationParams(stop_sequences=args.stop or [])
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"):
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    request = llama_pb2.GenerateStreamRequest(user_prompt=args.prompt, system_prompt=args.system or "",
                                              params=params)
    if args.rag:
        request.rag_context = args.rag
    started, first = time.perf_counter(), None
    try:
        for message in llama_pb2_grpc.LlamaServiceStub(channel).GenerateStream(
                request, metadata=_metadata(args), timeout=args.timeout):
            if message.HasField("token"):
                first = first or time.perf_counter()
                sys.stdout.write(message.token.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                d = message.finish_details
                took = time.perf_counter() - started
                ttft = f", first token after {(first - started) * 1000:.0f} ms" if first else ""
                print(f"\n[{d.finish_reason}: {d.prompt_tokens} prompt + {d.completion_tokens} completion tokens "
                      f"in {took:.2f} s{ttft}]", file=sys.stderr)
        return 0
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def check_health(channel: grpc.Channel, timeout: float) -> dict[str, str]:
    """Status name per health service name ('' = the whole server)."""
    stub = health_pb2_grpc.HealthStub(channel)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name
    return {name: status(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout).status)
            for name in ("", SERVICE)}


def health(args, channel: grpc.Channel) -> int:
    try:
        statuses = check_health(channel, args.timeout or 10)
    except grpc.RpcError as exc:
        print(f"unreachable: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    for name, status in statuses.items():
        print(f"{name or '(server)'}: {status}")
    return 0 if all(s == "SERVING" for s in statuses.values()) else 1


def wait_for_ready(args, channel: grpc.Channel) -> int:
    deadline = time.monotonic() + args.timeout
    last = "not tried"
    while time.monotonic() < deadline:
        try:
            statuses = check_health(channel, min(5.0, max(0.1, deadline - time.monotonic())))
            if all(s == "SERVING" for s in statuses.values()):
                print("ready")
                return 0
            last = ", ".join(f"{n or '(server)'} {s}" for n, s in statuses.items())
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.5)
    print(f"not ready after {args.timeout:g} s ({last})", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sentiric-llama client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=os.environ.get("LLM_LLAMA_SERVICE_GRPC_TARGET", "127.0.0.1:16071"),
                   help="host:port of the gRPC service (default: %(default)s) [env LLM_LLAMA_SERVICE_GRPC_TARGET]")
    p.add_argument("--tls-ca", default=os.environ.get("GRPC_TLS_CA_PATH"),
                   help="CA that signed the server's certificate: turns TLS on [env GRPC_TLS_CA_PATH]")
    p.add_argument("--tls-cert", default=os.environ.get("LLM_LLAMA_SERVICE_CERT_PATH"),
                   help="client certificate for mutual TLS [env LLM_LLAMA_SERVICE_CERT_PATH]")
    p.add_argument("--tls-key", default=os.environ.get("LLM_LLAMA_SERVICE_KEY_PATH"),
                   help="client key for mutual TLS [env LLM_LLAMA_SERVICE_KEY_PATH]")
    p.add_argument("--server-name", help="expected name in the server's certificate (default: the target host)")
    p.add_argument("--tenant", help="x-tenant-id metadata")
    p.add_argument("--trace", help="x-trace-id metadata")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream the answer to one question")
    gen.add_argument("prompt")
    gen.add_argument("--system", help="system prompt")
    gen.add_argument("--rag", help="RAG context (documents)")
    gen.add_argument("--max-tokens", dest="max_new_tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    gen.set_defaults(run=generate)
    hc = sub.add_parser("health", help="grpc.health.v1 status of the server and of LlamaService")
    hc.add_argument("--timeout", type=float, default=10)
    hc.set_defaults(run=health)
    wait = sub.add_parser("wait-for-ready", help="wait until the service is SERVING (exit 1 after --timeout)")
    wait.add_argument("--timeout", type=float, default=120)
    wait.set_defaults(run=wait_for_ready)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        channel = open_channel(args.target, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                               server_name=args.server_name)
    except OSError as exc:
        print(f"error: cannot read a TLS file: {exc}", file=sys.stderr)
        return 2
    with channel:
        return args.run(args, channel)
