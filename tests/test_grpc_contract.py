"""The committed gRPC modules are exactly what the repo's .proto generates, and the contract's wire facts
(field numbers, optionality) are the platform's."""

import subprocess
import sys
from pathlib import Path

import pytest

from server.proto import llama_pb2

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PROTO = "server/proto/llama.proto"


def test_generated_modules_match_the_proto(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", PROTO], cwd=ROOT, check=True)
    for name in ("llama_pb2.py", "llama_pb2_grpc.py"):
        fresh = (tmp_path / "server/proto" / name).read_text()
        assert fresh == (ROOT / "server/proto" / name).read_text(), (
            f"server/proto/{name} is stale: regenerate it with the command in {PROTO}")


def test_wire_contract():
    fields = {m.name: {f.name: (f.number, f.type, f.is_repeated, f.has_presence) for f in m.fields}
              for m in llama_pb2.DESCRIPTOR.message_types_by_name.values()}
    F = llama_pb2.DESCRIPTOR.message_types_by_name["GenerateStreamRequest"].fields_by_name["system_prompt"]
    STRING, BYTES, MESSAGE, INT32, INT64, FLOAT = (F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_MESSAGE, F.TYPE_INT32,
                                                   F.TYPE_INT64, F.TYPE_FLOAT)
    req = fields["GenerateStreamRequest"]
    assert {k: v[:2] for k, v in req.items()} == {
        "system_prompt": (1, STRING), "user_prompt": (2, STRING), "rag_context": (3, STRING), "history": (4, MESSAGE),
        "params": (5, MESSAGE), "lora_adapter_id": (6, STRING)}
    assert req["rag_context"][3] and req["lora_adapter_id"][3] and req["params"][3] and not req["user_prompt"][3]
    assert req["history"][2] and fields["GenerationParams"]["stop_sequences"][2]
    assert all(v[3] for k, v in fields["GenerationParams"].items() if k != "stop_sequences")  # all `optional`
    assert {k: v[:2] for k, v in fields["GenerationParams"].items()} == {
        "max_new_tokens": (1, INT32), "temperature": (2, FLOAT), "top_k": (3, INT32), "top_p": (4, FLOAT),
        "repetition_penalty": (5, FLOAT), "stop_sequences": (6, STRING), "seed": (7, INT64),
        "engine_specific_params": (20, MESSAGE)}
    assert {k: v[:2] for k, v in fields["GenerateStreamResponse"].items()} == {"token": (1, BYTES),
                                                                             "finish_details": (2, MESSAGE)}
    assert {k: v[:2] for k, v in fields["FinishDetails"].items()} == {
        "finish_reason": (1, STRING), "prompt_tokens": (2, INT32), "completion_tokens": (3, INT32)}
    assert {k: v[:2] for k, v in fields["ConversationTurn"].items()} == {"role": (1, STRING), "content": (2, STRING)}
    assert llama_pb2.DESCRIPTOR.package == "sentiric.llm.v1"
    method = llama_pb2.DESCRIPTOR.services_by_name["LlamaService"].methods_by_name["GenerateStream"]
    assert method.server_streaming and not method.client_streaming
