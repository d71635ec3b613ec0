"""One streamed sentiric.llm.v1.LlamaService/GenerateStream call, shared by
the serving benchmark (grpc.aio) and the locust gRPC user (the synchronous
API, which gevent can drive): the same OpenAI-style messages the HTTP clients
send become a GenerateStreamRequest, and the answer is timed token message by
token message, with the token counts from finish_details."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from loadtest.stats import decode_rate
from server.proto import llama_pb2


def generate_request(messages: list[dict], *, max_tokens: int, ignore_eos: bool = True,
                     temperature: float | None = None) -> llama_pb2.GenerateStreamRequest:
    """The call the platform's gateway would make for this chat: a leading system message
    becomes system_prompt, the final user message user_prompt, the turns between history.
    The service shapes both into the same prompt, so the two doors do the same work."""
    turns = list(messages)
    system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else ""
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a GenerateStream call answers a user turn: the messages must end with one")
    user = turns.pop()["content"]
    params = llama_pb2.GenerationParams(max_new_tokens=max_tokens)
    if temperature is not None:
        params.temperature = temperature
    if ignore_eos:
        params.engine_specific_params.update({"ignore_eos": True})
    return llama_pb2.GenerateStreamRequest(
        system_prompt=system, user_prompt=user, params=params,
        history=[llama_pb2.ConversationTurn(role=t["role"], content=t["content"]) for t in turns])


@dataclass
class StreamResult:
    """One call as the client saw it; times are time.perf_counter() seconds."""
    t_start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each token message
    finish: llama_pb2.FinishDetails | None = None
    error: str | None = None                               # "CODE: details" when the call failed
    t_end: float | None = None

    def record(self, message: llama_pb2.GenerateStreamResponse, now: float) -> None:
        if message.HasField("token"):
            self.token_times.append(now)
        elif message.HasField("finish_details"):
            self.finish = message.finish_details

    def failed(self, exc: grpc.RpcError) -> None:
        self.error = f"{exc.code().name}: {exc.details()}"

    def ended(self, now: float) -> None:
        self.t_end = now
        if self.error is None and self.finish is None:
            self.error = "the stream ended without finish_details"

    @property
    def failure(self) -> str | None:
        """Why the call does not count as an answer: its status, or not one token message."""
        if self.error:
            return self.error
        return None if self.token_times else "no content in the stream"

    @property
    def ttft(self) -> float | None:
        """Seconds from sending to the first token message."""
        return self.token_times[0] - self.t_start if self.token_times else None

    @property
    def completion_tokens(self) -> int:
        return self.finish.completion_tokens if self.finish else 0

    @property
    def prompt_tokens(self) -> int | None:
        return self.finish.prompt_tokens if self.finish else None

    def decode_rate(self) -> float | None:
        return decode_rate(self.token_times, self.completion_tokens)


async def stream_async(stub, request: llama_pb2.GenerateStreamRequest, *, timeout: float) -> StreamResult:
    """One call over a grpc.aio stub (the benchmark's event loop)."""
    result = StreamResult(time.perf_counter())
    try:
        async for message in stub.GenerateStream(request, timeout=timeout):
            result.record(message, time.perf_counter())
    except grpc.RpcError as exc:
        result.failed(exc)
    result.ended(time.perf_counter())
    return result


def stream_sync(stub, request: llama_pb2.GenerateStreamRequest, *, timeout: float) -> StreamResult:
    """One call over a synchronous stub (locust, whose users are greenlets, not asyncio tasks)."""
    result = StreamResult(time.perf_counter())
    try:
        for message in stub.GenerateStream(request, timeout=timeout):
            result.record(message, time.perf_counter())
    except grpc.RpcError as exc:
        result.failed(exc)
    result.ended(time.perf_counter())
    return result
