"""The part of /openapi.json that describes llama-server's own routes (server/web/llama_routes.py,
slot_routes.py, rerank_routes.py, the unprefixed aliases): their requests field by field, their
answers by their main fields."""

from __future__ import annotations

from server.web.openapi import _errors, _generation_ok, _integer, _json, _post, _ref

_PROMPT_PIECE = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": ["integer", "string"]}},
                           {"type": "object", "required": ["prompt_string"],
                            "properties": {"prompt_string": {"type": "string"}}}]}

def schemas(sampling: dict) -> dict:
    text = {"type": "string"}
    answer = {"type": "object", "properties": {"content": text, "tokens": {"type": "array"},
                                               "stop": {"type": "boolean"}, "timings": {"type": "object"},
                                               "generation_settings": {"type": "object"}}}
    return {
        "LlamaCompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
            "prompt": {"description": "Text, token ids, both mixed, {prompt_string}, or a list of those (one "
                                      "answer each).",
                       "oneOf": [*_PROMPT_PIECE["oneOf"], {"type": "array", "minItems": 1, "items": _PROMPT_PIECE}]},
            "n_probs": _integer("The chosen token's and the n best tokens' log-probabilities per token.",
                                minimum=0, maximum=20),
            "post_sampling_probs": {"type": "boolean", "description": "Probabilities instead of log-probabilities "
                                                                     "(of the distribution before the samplers)."},
            "return_tokens": {"type": "boolean", "description": "The generated token ids in the answer."},
            "response_fields": {"type": "array", "items": text,
                                "description": "Only these fields ('a/b' for a nested one)."},
            **sampling}},
        "RerankRequest": {"type": "object", "required": ["query"], "properties": {
            "query": text, "model": text,
            "documents": {"type": "array", "minItems": 1, "items": text},
            "texts": {"type": "array", "minItems": 1, "items": text, "description": "TEI's name for documents."},
            "top_n": _integer("The best n (default all).", minimum=0),
            "return_text": {"type": "boolean", "description": "TEI: each result carries its text."}}},
        "Props": {"type": "object", "description": "llama-server's settings to change (none change here)"},
        "SlotFile": {"type": "object", "properties": {"filename": {
            "type": "string", "description": "A file name in --slot-save-path (save, restore)."}}},
        "LlamaCompletion": {"description": "One answer, or a list of them with several prompts.",
                            "oneOf": [answer, {"type": "array", "items": answer}]},
    }


def paths() -> dict:
    obj, arr = {"type": "object"}, {"type": "array"}
    rerank = _post("Rerank documents by the model's rank head (--reranking; 501 without)", "RerankRequest",
                   _json({"oneOf": [obj, arr]}), 400, 401, 413, 501, 503)
    input_tokens = _post("How many tokens a chat request's prompt has", "ChatCompletionRequest",
                         _json({"type": "object", "properties": {"input_tokens": {"type": "integer"}}}),
                         400, 401, 404, 413, 503)
    embeddings = _post("Embeddings in llama-server's shape: [{index, embedding: [vector, ...]}] (one vector per "
                       "token with --embeddings-pooling none)", "EmbeddingRequest", _json(arr), 400, 401, 404, 413, 503)
    return {
        "/completion": _post("llama-server's completion: prompts in its shapes, its answer (content, tokens, "
                             "timings, completion_probabilities)", "LlamaCompletionRequest",
                             _generation_ok("LlamaCompletion"), 400, 401, 404, 413, 429, 503),
        "/completions": _post("Same as /completion", "LlamaCompletionRequest", _generation_ok("LlamaCompletion"),
                              400, 401, 404, 413, 429, 503),
        "/chat/completions": _post("Same as /v1/chat/completions (llama-server's fields too)", "ChatCompletionRequest",
                                   _generation_ok("ChatCompletion"), 400, 401, 404, 413, 429, 503),
        "/apply-template": _post("The prompt a chat request would get, as text", "ChatCompletionRequest",
                                 _json({"type": "object", "properties": {"prompt": {"type": "string"}}}),
                                 400, 401, 404, 413, 503),
        "/chat/completions/input_tokens": input_tokens, "/v1/chat/completions/input_tokens": input_tokens,
        "/embeddings": embeddings, "/embedding": embeddings,
        "/rerank": rerank, "/reranking": rerank, "/v1/rerank": rerank, "/v1/reranking": rerank,
        "/props": {"get": {"summary": "The server's settings as llama-server reports them", "responses": {
                       "200": _json(obj), **_errors(401, 503)}},
                   **_post("Accepted with --props (nothing changes at run time), else 501", "Props",
                           _json(obj), 400, 401, 413, 501)},
        "/slots": {"get": {"summary": "The slots and which are processing (--no-slots: 501)", "responses": {
            "200": _json(arr), **_errors(401, 501, 503)}}},
        "/slots/{id_slot}": {"post": {
            "summary": "Save an idle slot's KV to a file of --slot-save-path, restore it, or erase the slot",
            "parameters": [{"name": "id_slot", "in": "path", "required": True, "schema": {"type": "integer"}},
                           {"name": "action", "in": "query", "required": True,
                            "schema": {"enum": ["save", "restore", "erase"]}}],
            "requestBody": {"content": {"application/json": {"schema": _ref("SlotFile")}}},
            "responses": {"200": _json(obj), **_errors(400, 401, 408, 413, 501, 503)}}},
        "/models": {"get": {"summary": "Same as /v1/models", "responses": {"200": _json(obj), **_errors(401, 503)}}},
        "/predict": {"post": {
            "summary": "Vertex AI's prediction route, only with AIP_MODE=PREDICTION (else 404): each instance names "
                       "a route by its @requestFormat (chatCompletions, completion, ...) and carries its body",
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object", "required": ["instances"], "properties": {"instances": {
                    "type": "array", "maxItems": 128, "items": {
                        "type": "object", "required": ["@requestFormat"],
                        "properties": {"@requestFormat": {"type": "string"}}}}}}}}},
            "responses": {"200": _json({"type": "object", "properties": {"predictions": arr}}),
                          **_errors(400, 401, 404, 408, 413)}}},
        "/v1/health": {"get": {"summary": "Same as /health", "security": [], "responses": {
            "200": _json(_ref("Health"), "Ready"), "503": _json(_ref("Health"), "Not ready")}}},
    }
