"""How the serving benchmark talks to a target: what a target is, what one
request gave (RequestResult), one streamed chat completion over HTTP (SSE) or
one GenerateStream call over gRPC, and the target's /metrics and model id."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import grpc

from loadtest import grpc_stream
from loadtest.openai_stream import StreamAccumulator, dumps
from loadtest.servers import ManagedServer
from loadtest.stats import inter_token_gaps, parse_prometheus
from server.proto import llama_pb2_grpc


@dataclass
class Target:
    name: str
    base_url: str                  # HTTP: the chat route, /metrics and /v1/models
    role: str                      # "ours" or "theirs"
    model_id: str = "default"
    server: ManagedServer | None = None
    # how the target is told to run to max_tokens: "ignore_eos" (llama.cpp, this service) or
    # "min_tokens" (llama-cpp-python, which ignores ignore_eos)
    length_field: str = "ignore_eos"
    door: str = "http"             # "grpc": requests go to grpc_target, /metrics still to base_url
    grpc_target: str | None = None  # host:port of the service's gRPC door
    info: dict = field(default_factory=dict)


@dataclass
class RequestResult:
    kind: str
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    usage_seen: bool = False       # the server counted the tokens (usage chunk / finish_details)
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        """The server's count of tokens over the time from sending to the last byte."""
        return self.completion_tokens / self.e2e if self.ok and self.e2e else 0.0

    @property
    def longest_gap(self) -> float:
        return max(self.gaps, default=0.0)


Send = Callable[[list[dict], str], Awaitable[RequestResult]]


async def story(session: aiohttp.ClientSession, base_url: str, max_tokens: int, model: str = "default") -> RequestResult:
    """One streamed ignore_eos story of max_tokens tokens: the steady stream the CPU-sharing benchmarks
    watch while something else runs."""
    args = argparse.Namespace(max_tokens=max_tokens, no_ignore_eos=False, temperature=None, request_timeout=600)
    return await stream_http(session, Target(model, base_url, "ours", model_id=model),
                             [{"role": "user", "content": "Tell me a long story about a lighthouse."}], "story", args)


@asynccontextmanager
async def open_client(target: Target, args) -> AsyncIterator[Send]:
    """send(messages, kind) for one level run: an HTTP session with a fresh connection per
    request, or one gRPC channel whose calls share its HTTP/2 connection, as the platform's
    gateway calls the service."""
    if target.door == "grpc":
        async with grpc.aio.insecure_channel(target.grpc_target) as channel:
            stub = llama_pb2_grpc.LlamaServiceStub(channel)
            yield lambda messages, kind: stream_grpc(stub, messages, kind, args)
        return
    # A fresh connection per request: llama-server closes the socket after each
    # streamed response although it advertises keep-alive, so reuse would
    # measure reconnect races rather than the server.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as session:
        yield lambda messages, kind: stream_http(session, target, messages, kind, args)


async def stream_http(session: aiohttp.ClientSession, target: Target, messages: list[dict], kind: str,
                      args, headers: dict | None = None, fields: dict | None = None) -> RequestResult:
    """One streamed chat completion; `headers` are sent with it (fleet_bench's routing key), `fields` in its
    body (bench_lora's adapter)."""
    body: dict = {"model": target.model_id, "messages": messages, "max_tokens": args.max_tokens,
                  "stream": True, "stream_options": {"include_usage": True}, **(fields or {})}
    if not args.no_ignore_eos:
        body[target.length_field] = True if target.length_field == "ignore_eos" else args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    t0 = time.perf_counter()
    acc = StreamAccumulator(t0)
    try:
        async with session.post(target.base_url + "/v1/chat/completions", data=dumps(body),
                                headers={"Content-Type": "application/json",
                                         "Accept": "text/event-stream", **(headers or {})}) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                return RequestResult(kind, False, error=f"HTTP {resp.status}: {text}")
            async for chunk in resp.content.iter_any():
                acc.feed(chunk, time.perf_counter())
            acc.finish(time.perf_counter())
    except asyncio.TimeoutError:
        return RequestResult(kind, False, error=f"timeout after {args.request_timeout}s")
    except (aiohttp.ClientError, OSError, ValueError) as e:
        return RequestResult(kind, False, error=f"{type(e).__name__}: {e}")
    t1 = time.perf_counter()
    if acc.error:
        return RequestResult(kind, False, error=f"stream error: {acc.error}")
    if not acc.content_times:
        return RequestResult(kind, False, error="no content in the stream")
    return RequestResult(kind, True, ttft=acc.ttft, e2e=t1 - t0, gaps=inter_token_gaps(acc.content_times),
                         completion_tokens=acc.completion_tokens, prompt_tokens=acc.prompt_tokens,
                         cached_tokens=acc.cached_tokens, usage_seen=acc.usage_seen)


async def stream_grpc(stub, messages: list[dict], kind: str, args) -> RequestResult:
    request = grpc_stream.generate_request(messages, max_tokens=args.max_tokens,
                                           ignore_eos=not args.no_ignore_eos, temperature=args.temperature)
    return grpc_result(await grpc_stream.stream_async(stub, request, timeout=args.request_timeout), kind)


def grpc_result(call: grpc_stream.StreamResult, kind: str) -> RequestResult:
    """A GenerateStream call as the benchmark counts a request: the same rules as for SSE."""
    if call.failure:
        return RequestResult(kind, False, error=f"gRPC {call.failure}")
    return RequestResult(kind, True, ttft=call.ttft, e2e=call.t_end - call.t_start,
                         gaps=inter_token_gaps(call.token_times), completion_tokens=call.completion_tokens,
                         prompt_tokens=call.prompt_tokens, usage_seen=True)


async def scrape_metrics(base_url: str) -> list | None:
    """/metrics samples, or None (no endpoint, or llama-server without --metrics)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(base_url + "/metrics") as r:
                return parse_prometheus(await r.text()) if r.status == 200 else None
    except (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError):
        return None


def first_model_id(base_url: str) -> str:
    try:
        with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as r:
            data = json.loads(r.read())
        items = data.get("data") or data.get("models") or []
        if items:
            return items[0].get("id") or items[0].get("model") or items[0].get("name") or "default"
    except (urllib.error.URLError, OSError, ValueError):
        pass
    return "default"
