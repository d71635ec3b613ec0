"""Random and malformed GenerateStreamRequests against the real gRPC door: every call must end with a
status in time, OK or a refusal that says what was wrong (never UNKNOWN or INTERNAL, never a hang),
and no worker may die. Requests go as raw bytes through a generic method, so the server also gets
what no protobuf library would send: strings that are not UTF-8, broken wire data, Structs nested
past protobuf's limit."""

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings, strategies as st

from server.proto import llama_pb2

pytestmark = pytest.mark.service

METHOD = "/sentiric.llm.v1.LlamaService/GenerateStream"
MAX_TOKENS = 8  # a fuzzed max_new_tokens may be 2**31-1 with ignore_eos: each would run to the end of the context
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,  # NOT_FOUND: lora
           grpc.StatusCode.RESOURCE_EXHAUSTED}  # over the message size limit
ENGINE_KEYS = ["min_p", "typical_p", "presence_penalty", "frequency_penalty", "repeat_last_n", "ignore_eos",
               "logit_bias", "grammar", "json_schema", "no_such_knob"]


@pytest.fixture(scope="module")
def fuzzed(start_server):
    """A service of its own (8 tokens unless asked) so a fuzzed request stays cheap."""
    return start_server("--parallel", "4", "--ctx-size", "4096", "--max-tokens", str(MAX_TOKENS))


@pytest.fixture(scope="module")
def call(fuzzed):
    """Sends raw request bytes; returns the status code and details the call ended with."""
    with grpc.insecure_channel(fuzzed.grpc_target, options=[("grpc.max_send_message_length", -1)]) as channel:
        generate = channel.unary_stream(METHOD)  # no serializers: bytes in, bytes out

        def send(data: bytes, metadata=()) -> tuple[grpc.StatusCode, str]:
            stream = generate(data, metadata=metadata, timeout=30)
            try:
                for _ in stream:
                    pass
            except grpc.RpcError:
                pass
            return stream.code(), stream.details()
        yield send


def check(fuzzed, restarts, result):
    code, details = result
    assert code in ANSWERS, (code, details)
    assert fuzzed.stats()["worker_restarts"] == restarts


@pytest.fixture(scope="module")
def restarts(fuzzed):
    return fuzzed.stats()["worker_restarts"]


# --- random messages -----------------------------------------------------------------------------
HUGE = "x" * 200_000
texts = st.text(max_size=40) | st.sampled_from(["", "\x00", "{{ raise_exception('x') }}", "<|im_end|>",
                                                "<|im_start|>system\n", "\u202e\ufeff"])
floats = st.floats(width=32)  # NaN and the infinities included
json_values = st.recursive(st.none() | st.booleans() | st.floats() | texts,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=12)
engine_params = st.dictionaries(st.sampled_from(ENGINE_KEYS) | st.text(max_size=8), json_values, max_size=5)


@st.composite
def requests(draw) -> llama_pb2.GenerateStreamRequest:
    req = llama_pb2.GenerateStreamRequest(
        system_prompt=draw(texts), user_prompt=draw(texts | st.sampled_from(["Hi", HUGE])),
        history=[llama_pb2.ConversationTurn(role=r, content=c) for r, c in draw(st.lists(st.tuples(
            st.sampled_from(["user", "assistant", "system", "developer", "tool", "", "wizard"]) | texts, texts),
            max_size=4))])
    if draw(st.booleans()):
        req.rag_context = draw(texts)
    if draw(st.integers(0, 9)) == 0:
        req.lora_adapter_id = draw(texts)
    if draw(st.booleans()):
        p = req.params
        p.SetInParent()
        for name, values in (("max_new_tokens", st.integers(-2**31, 2**31 - 1)), ("temperature", floats),
                             ("top_k", st.integers(-2**31, 2**31 - 1)), ("top_p", floats),
                             ("repetition_penalty", floats), ("seed", st.integers(-2**63, 2**63 - 1))):
            if draw(st.booleans()):
                setattr(p, name, draw(values))
        if p.HasField("max_new_tokens") and p.max_new_tokens > MAX_TOKENS:
            p.max_new_tokens = MAX_TOKENS
        p.stop_sequences.extend(draw(st.lists(texts, max_size=3) | st.just(["a"] * 5000) | st.just([HUGE] * 16)))
        if draw(st.booleans()):
            p.engine_specific_params.update(draw(engine_params))
    return req


metadata = st.lists(st.tuples(st.sampled_from(["x-tenant-id", "x-trace-id", "x-span-id", "x-other"]),
                              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=300)),
                    max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(req=requests(), meta=metadata)
def test_random_requests_end_with_a_clear_status(fuzzed, call, restarts, req, meta):
    check(fuzzed, restarts, call(req.SerializeToString(), meta))


# --- malformed wire data -------------------------------------------------------------------------
def varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, messages)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_struct(depth: int) -> bytes:
    """A Struct {"a": {"a": ...}} `depth` levels deep (Struct.fields entry {key, Value.struct_value})."""
    struct = b""
    for _ in range(depth):
        struct = field(1, field(1, b"a") + field(2, field(5, struct)))
    return struct


BAD_UTF8 = b"\xff\xfe\xc3\x28\xed\xa0\x80"
HI = field(2, b"Hi")
MALFORMED = {
    "user_prompt not UTF-8": field(2, BAD_UTF8),
    "system_prompt not UTF-8": field(1, BAD_UTF8) + HI,
    "rag_context not UTF-8": field(3, BAD_UTF8) + HI,
    "history role not UTF-8": field(4, field(1, BAD_UTF8) + field(2, b"x")) + HI,
    "history content not UTF-8": field(4, field(1, b"user") + field(2, BAD_UTF8)),
    "stop sequence not UTF-8": HI + field(5, field(6, BAD_UTF8)),
    "lora adapter not UTF-8": HI + field(6, BAD_UTF8),
    "Struct key not UTF-8": HI + field(5, field(20, field(1, field(1, BAD_UTF8)))),
    "Struct nested 150 deep": HI + field(5, field(20, nested_struct(150))),
    "truncated": HI[:-1],
    "length past the end": varint(2 << 3 | 2) + varint(1000) + b"Hi",
    "bad wire type": bytes([2 << 3 | 7]) + b"\x01",
    "group start": bytes([2 << 3 | 3]),
    "huge varint": bytes([1 << 3 | 0]) + b"\xff" * 11,
    "string field as varint": bytes([2 << 3 | 0, 1]),
    "params as fixed64": HI + bytes([5 << 3 | 1]) + b"\x00" * 8,  # kept as an unknown field: answered
    "unknown fields only": field(99, b"?") + varint(100 << 3 | 0) + varint(5),  # an empty request: nothing to answer
    "empty": b"",
    "over the size limit": field(2, b"x" * (9 * 1024 * 1024)),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_end_with_a_clear_status(fuzzed, call, restarts, data):
    check(fuzzed, restarts, call(data))
