#!/usr/bin/env python3
"""The KV store (docs/kv-store.md) side by side with llama-server on the same build, model and threads.

1. Restart: a RAG request on a ~1,000-token document, the server stopped (SIGTERM) and started again,
   then the document's next question: its TTFT for the service with --kv-store, the service without,
   and llama-server (which forgets its prompt cache on restart).
2. Rotation: N distinct documents (~850 tokens with the chat template) in turn through --parallel 4, twice: the second pass's
   TTFT p50 against the first, for the service with a RAM tier and llama-server with its default
   --cache-ram.
3. KV types: bytes per cell and sequences of 4,096 cells in the same memory, f16 against q8_0, and
   chat tokens/s (4 concurrent answers of 128 tokens) with each.

  flock /tmp/sentiric-cpu.lock python3 loadtest/bench_kv_store.py --documents 40
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest import servers  # noqa: E402

QUESTIONS = ["What is the access code for the vault?", "Tell me the vault's access code."]


def document(i: int, tokens: int) -> str:
    """A distinct document of about `tokens` tokens with one fact in it."""
    sentence = f"Archive {i} entry {{k}} records that shipment {i}-{{k}} left the depot on time. "
    body = "".join(sentence.format(k=k) for k in range(tokens // 16))
    return f"{body}The access code for the vault is {7000 + i}."


def messages(i: int, tokens: int, question: str) -> list[dict]:
    return [{"role": "system", "content": f"Answer from this document.\n{document(i, tokens)}"},
            {"role": "user", "content": question}]


def stream(base_url: str, msgs: list[dict], max_tokens: int = 8) -> tuple[float, float, int]:
    """(TTFT, total seconds, completion tokens) of one streamed chat completion."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"model": "x", "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    ttft, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    total = time.perf_counter() - t0
    return ttft if ttft is not None else total, total, tokens


def stats(server) -> dict:
    """The server's /stats ({} from llama-server, which has none)."""
    try:
        with urllib.request.urlopen(server.base_url + "/stats", timeout=30) as r:
            return json.loads(r.read())
    except OSError:
        return {}


class Run:
    def __init__(self, args):
        self.args = args
        self.model = servers.resolve_model(args.model)
        self.log_dir = Path(args.log_dir)

    def service(self, name: str, *flags: str) -> servers.ManagedServer:
        port, grpc = servers.free_ports(2)
        argv = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--grpc-port",
                str(grpc), "--model", self.model, "--threads", str(self.args.threads), *flags]
        return self._start(name, argv, port)

    def llama_server(self, name: str, parallel: int, *extra: str) -> servers.ManagedServer:
        port = servers.free_ports(1)[0]
        argv = servers.llama_server_command(Path(self.args.llama_server_bin), port=port, model=self.model,
                                            threads=self.args.threads, parallel=parallel,
                                            ctx_size=parallel * 4096, unified_kv=False, extra=" ".join(extra))
        return self._start(name, argv, port)

    def _start(self, name, argv, port) -> servers.ManagedServer:
        server = servers.ManagedServer(name, argv, port, self.log_dir)
        server.wait_ready(self.args.ready_timeout)
        return server

    def restart(self, name: str, start) -> float:
        """TTFT of a document's second question after a restart."""
        server = start()
        try:
            stream(server.base_url, messages(0, 1000, QUESTIONS[0]))
        finally:
            server.stop()
        server = start()
        try:
            return stream(server.base_url, messages(0, 1000, QUESTIONS[1]))[0]
        finally:
            server.stop()

    def rotation(self, start, n: int) -> tuple[float, float, dict | None]:
        """TTFT p50 of the first and second pass over n documents, and the KV store's numbers."""
        server = start()
        try:
            passes = [[stream(server.base_url, messages(i, 600, QUESTIONS[0]))[0] for i in range(n)]
                      for _ in range(2)]
            store = stats(server).get("kv_store")
        finally:
            server.stop()
        return statistics.median(passes[0]), statistics.median(passes[1]), store

    def chat_speed(self, start) -> tuple[float, dict]:
        """Aggregate tokens/s of 4 concurrent 128-token answers, and the service's /stats."""
        server = start()
        try:
            stream(server.base_url, [{"role": "user", "content": "Hi"}], 4)
            results = []

            def one(k):
                results.append(stream(server.base_url, [{"role": "user", "content": f"Write a story about a "
                                                         f"robot number {k}."}], 128))
            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
            return sum(r[2] for r in results) / seconds, stats(server)
        finally:
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=40)
    p.add_argument("--model", help="GGUF path (default: the service's default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-server-bin", default=str(servers.DEFAULT_LLAMA_SERVER))
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", default=str(servers.LOADTEST / "results" / "logs"))
    p.add_argument("--parts", default="restart,rotation,types")
    args = p.parse_args()
    run, parts, out = Run(args), args.parts.split(","), {}
    base = ("--parallel", "4", "--ctx-size", "16384")
    with tempfile.TemporaryDirectory(prefix="bench-kv-store-") as store:
        if "restart" in parts:
            with_store = run.restart("store", lambda: run.service("service-store", *base, "--kv-store", store))
            without = run.restart("plain", lambda: run.service("service", *base))
            reference = run.restart("llama-server", lambda: run.llama_server("llama-server", 4))
            out["restart_ttft_s"] = {"service_kv_store": round(with_store, 3), "service": round(without, 3),
                                     "llama_server": round(reference, 3),
                                     "x_lower_than_service": round(without / with_store, 1),
                                     "x_lower_than_llama_server": round(reference / with_store, 1)}
            print(json.dumps(out["restart_ttft_s"]), flush=True)
    if "rotation" in parts:
        n = args.documents
        ours = run.rotation(lambda: run.service("service-ram", *base, "--kv-ram-mb", "4096"), n)
        ref = run.rotation(lambda: run.llama_server("llama-server-cache-ram", 4), n)
        out["rotation_ttft_p50_s"] = {
            "documents": n, "service_first": round(ours[0], 3), "service_second": round(ours[1], 3),
            "llama_server_first": round(ref[0], 3), "llama_server_second": round(ref[1], 3),
            "service_x_second_vs_first": round(ours[0] / ours[1], 1),
            "service_second_vs_llama_server_second": round(ours[1] / ref[1], 2), "service_kv_store": ours[2]}
        print(json.dumps(out["rotation_ttft_p50_s"]), flush=True)
    if "types" in parts:
        f16 = run.chat_speed(lambda: run.service("service-f16", *base))
        q8 = run.chat_speed(lambda: run.service("service-q8", *base, "--cache-type-k", "q8_0",
                                                "--cache-type-v", "q8_0"))
        per_cell = {"f16": f16[1]["kv_bytes_per_cell"], "q8_0": q8[1]["kv_bytes_per_cell"]}
        out["kv_types"] = {"bytes_per_cell": per_cell,
                           "mib_per_4096_cell_sequence": {k: round(v * 4096 / 2**20, 1) for k, v in per_cell.items()},
                           "sequences_in_f16_memory_x": round(per_cell["f16"] / per_cell["q8_0"], 2),
                           "chat_tok_s": {"f16": round(f16[0], 1), "q8_0": round(q8[0], 1)},
                           "q8_0_speed_vs_f16": round(q8[0] / f16[0], 2)}
        print(json.dumps(out["kv_types"]), flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
