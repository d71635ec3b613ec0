"""The gRPC door: sentiric.llm.v1.LlamaService/GenerateStream, the way the
platform's llm-gateway-service calls the service, with the standard health
service and server reflection beside it.

It runs on the HTTP door's event loop and feeds the same engine, so requests
from every door share decode steps. A call is translated into the shared
shaping's names (server/shaping.py), goes through the shared admission
(server/admission.py), and is answered as token messages (whole UTF-8
characters of the answer, read as the HTTP door reads it: stop strings held
back, a thinking section left out) and exactly one finish_details; a refusal
ends the call with its kind's status code (CODES) and its message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import logs
from server.answers import ChatAnswer
from server.proto import llama_pb2, llama_pb2_grpc
from server.refusal import INTERNAL_MESSAGE, Refusal, invalid

if TYPE_CHECKING:  # the door gets its admission from server/serve.py; its status codes stay importable alone
    from server.admission import Admission

log = logging.getLogger("sentiric.grpc")
SERVICE = llama_pb2.DESCRIPTOR.services_by_name["LlamaService"].full_name
METHOD = f"/{SERVICE}/GenerateStream"
# the HTTP-only knobs a caller may send in engine_specific_params, by their OpenAI / llama.cpp names
ENGINE_SPECIFIC = ("min_p", "typical_p", "presence_penalty", "frequency_penalty", "repeat_last_n", "ignore_eos",
                   "logit_bias", "grammar", "json_schema", "reasoning_format", "reasoning_effort",
                   "chat_template_kwargs", "priority", "speculative", "spec")
# the gRPC field each canonical parameter came from, so an error names what the caller sent
_FIELDS = {"max_tokens": "params.max_new_tokens", "temperature": "params.temperature", "top_k": "params.top_k",
           "top_p": "params.top_p", "repeat_penalty": "params.repetition_penalty", "stop": "params.stop_sequences",
           "seed": "params.seed", "system_prompt": "system_prompt", "rag_context": "rag_context",
           "messages": "history", "response_format.json_schema": "params.engine_specific_params.json_schema",
           "lora_adapter": "lora_adapter_id"}

# each refusal kind's status code
CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "too_long": grpc.StatusCode.INVALID_ARGUMENT,
         "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
         "not_found": grpc.StatusCode.NOT_FOUND, "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
         "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED, "unprocessable": grpc.StatusCode.FAILED_PRECONDITION,
         "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED, "loading": grpc.StatusCode.UNAVAILABLE,
         "switching": grpc.StatusCode.UNAVAILABLE, "draining": grpc.StatusCode.UNAVAILABLE,
         "unavailable": grpc.StatusCode.UNAVAILABLE, "not_supported": grpc.StatusCode.UNIMPLEMENTED,
         "internal": grpc.StatusCode.INTERNAL}


def chat_body(request: llama_pb2.GenerateStreamRequest) -> tuple[dict, callable]:
    """The call as the shared shaping's chat body (OpenAI / llama.cpp names), and the function that
    names each of those fields as the gRPC caller spelled it."""
    turns = [{"role": t.role, "content": t.content} for t in request.history]
    n_history = len(turns)
    if request.user_prompt:
        turns.append({"role": "user", "content": request.user_prompt})
    elif not turns or turns[-1]["role"] != "user":
        raise invalid("'user_prompt' is empty and 'history' does not end with a user turn: there is "
                      "nothing to answer", "user_prompt")
    body = {"messages": turns, "system_prompt": request.system_prompt,
            "rag_context": request.rag_context if request.HasField("rag_context") else None,
            "lora_adapter": request.lora_adapter_id if request.HasField("lora_adapter_id") else None}
    if request.HasField("params"):
        body.update(_params(request.params))

    def label(name: str) -> str:
        if name.startswith("messages["):
            i, rest = int(name[9:name.index("]")]), name[name.index("]") + 1:]
            return f"history[{i}]{rest}" if i < n_history else "user_prompt"
        return _FIELDS.get(name) or f"params.engine_specific_params.{name}"
    return body, label


def _params(p: llama_pb2.GenerationParams) -> dict:
    out = {}
    for grpc_name, name in (("max_new_tokens", "max_tokens"), ("temperature", "temperature"), ("top_k", "top_k"),
                            ("top_p", "top_p"), ("repetition_penalty", "repeat_penalty"), ("seed", "seed")):
        if p.HasField(grpc_name):
            value = getattr(p, grpc_name)
            out[name] = float(f"{value:.7g}") if isinstance(value, float) else value  # float32 as the caller wrote it
    if p.stop_sequences:
        out["stop"] = list(p.stop_sequences)
    if p.HasField("engine_specific_params"):
        try:
            extra = json_format.MessageToDict(p.engine_specific_params)
        except ValueError as exc:  # a Struct number that JSON cannot carry
            raise invalid(f"'params.engine_specific_params' holds NaN or infinity, which no parameter "
                          f"accepts ({exc})", "params.engine_specific_params") from None
        unknown = sorted(k for k in extra if k not in ENGINE_SPECIFIC)
        if unknown:
            log.warning("ignoring unknown engine_specific_params: %s (known: %s)", ", ".join(unknown),
                        ", ".join(ENGINE_SPECIFIC), extra=logs.event("UNKNOWN_PARAMS_IGNORED", keys=unknown))
        for key in ENGINE_SPECIFIC:
            if key in extra:
                out[key] = extra[key]
        if "json_schema" in out:
            out["response_format"] = {"type": "json_schema", "json_schema": {"schema": out.pop("json_schema")}}
    return out


def spoken(deltas: list[dict]) -> str:
    """The answer's text in a chat answer's deltas: the contract has one stream of text, so a thinking
    section (reasoning_content, split as for HTTP unless reasoning_format is "none") is not sent."""
    return "".join(d.get("content", "") for d in deltas)


def parse_request(data: bytes) -> llama_pb2.GenerateStreamRequest | DecodeError:
    """The request, or why it cannot be parsed (a string field that is not UTF-8, a Struct nested past
    protobuf's limit, broken wire data): GenerateStream refuses that with INVALID_ARGUMENT, where
    grpcio's own deserializer would end the call with an opaque INTERNAL."""
    try:
        return llama_pb2.GenerateStreamRequest.FromString(data)
    except DecodeError as exc:
        return exc


class LlamaService(llama_pb2_grpc.LlamaServiceServicer):
    def __init__(self, admission: Admission):
        self.admission = admission

    async def GenerateStream(self, request, context):
        start = time.perf_counter()
        code, message, final = grpc.StatusCode.OK, "", None
        try:
            self.admission.identify(dict(context.invocation_metadata() or ()), carrier="metadata")
            if isinstance(request, DecodeError):
                raise invalid("The request is not a valid GenerateStreamRequest (string fields must be UTF-8, "
                              f"Structs nest at most 100 deep): {request}")
            async with self.admission.serve() as served:  # during a model switch this waits for the new model
                gen = served.shaper.chat(*chat_body(request))
                async with self.admission.submit(served, gen) as run:
                    answer = ChatAnswer(gen.answer)
                    async for _, out in run:
                        text = spoken(answer.feed(out.text) if out.text else [])
                        if out.finish_reason:
                            final = out
                            text += spoken(answer.finish())
                        if text:
                            await context.write(llama_pb2.GenerateStreamResponse(token=text.encode()))
                        if final is not None:
                            run.usage([final])
                            await context.write(llama_pb2.GenerateStreamResponse(
                                finish_details=llama_pb2.FinishDetails(
                                    finish_reason=final.finish_reason, prompt_tokens=final.prompt_tokens,
                                    completion_tokens=final.completion_tokens)))
        except Refusal as exc:
            code, message = CODES[exc.kind], exc.message
            context.set_code(code)
            context.set_details(message)
        except asyncio.CancelledError:  # the caller went away, or its deadline passed (give or take the clocks)
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining < 0.1 \
                else grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
            log.exception("internal error while serving GenerateStream", extra=logs.event("INTERNAL_ERROR",
                                                                                         door="grpc"))
            context.set_code(code)
            context.set_details(message)
        finally:
            self._finished(code, message, final, start)

    def _finished(self, code: grpc.StatusCode, message: str, final, start: float) -> None:
        ms = (time.perf_counter() - start) * 1000
        self.admission.metrics.grpc_requests.labels(METHOD, code.name).inc()
        attributes = {"door": "grpc", "method": METHOD, "code": code.name, "duration_ms": round(ms, 1)}
        if final is not None:
            attributes.update(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
                              finish_reason=final.finish_reason)
        if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.info("GenerateStream %s after %.1f ms; its generation was cancelled", code.name, ms,
                     extra=logs.event("CLIENT_DISCONNECTED", **attributes))
        else:
            log.info("GenerateStream %s %.1f ms%s", code.name, ms, f": {message}" if message else "",
                     extra=logs.event("REQUEST_FINISHED", **attributes))


@dataclass
class GrpcSettings:
    host: str = "127.0.0.1"
    port: int = 16071
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None       # with a CA, clients must present a certificate it signed (mutual TLS)
    max_message_bytes: int = 8 * 1024 * 1024

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key)

    def credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the files, None for plaintext; ValueError says what is wrong."""
        if not self.tls:
            if self.tls_ca:
                raise ValueError("--grpc-tls-ca needs --grpc-tls-cert and --grpc-tls-key")
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("--grpc-tls-cert and --grpc-tls-key go together")

        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read the gRPC TLS {what} {path}: {exc.strerror}") from None
        ca = read(self.tls_ca, "CA") if self.tls_ca else None
        return grpc.ssl_server_credentials([(read(self.tls_key, "key"), read(self.tls_cert, "certificate"))],
                                           root_certificates=ca, require_client_auth=ca is not None)


def listen_hosts(host: str) -> list[str]:
    """The addresses of --host (comma separated)."""
    return [h.strip() for h in host.split(",") if h.strip()]


class GrpcDoor:
    """The gRPC server: LlamaService, health (NOT_SERVING until the model is ready) and reflection."""

    def __init__(self, service: LlamaService, settings: GrpcSettings):
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
            ("grpc.max_receive_message_length", settings.max_message_bytes),
        ])
        handlers = {"GenerateStream": grpc.unary_stream_rpc_method_handler(
            service.GenerateStream, request_deserializer=parse_request,
            response_serializer=llama_pb2.GenerateStreamResponse.SerializeToString)}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.server.add_registered_method_handlers(SERVICE, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)

    async def start(self) -> None:
        """Listen (raises OSError when the address cannot be bound) and report NOT_SERVING."""
        s = self.settings
        credentials = s.credentials()
        for host in listen_hosts(s.host):
            address = f"[{host}]:{s.port}" if ":" in host else f"{host}:{s.port}"
            try:
                if credentials is None:
                    self.server.add_insecure_port(address)
                else:
                    self.server.add_secure_port(address, credentials)
            except RuntimeError:
                raise OSError(f"cannot listen on {address} (in use, or not an address of this machine)") from None
        await self.server.start()
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)
