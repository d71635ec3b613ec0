"""POST /v1/embeddings, shaped exactly like OpenAI's: `input` as a string, a
list of strings, a list of token ids or a list of lists of token ids; vectors
as floats or base64 (little-endian float32); usage counts the input tokens.
The vectors come from the embedding pool (engine/embedder.py)."""

from __future__ import annotations

import base64

import orjson
from aiohttp import web

from engine.embedder import EmbedderError
from server.admission import Admission
from server.refusal import Refusal, invalid
from server.web.errors import read_json

EMBEDDINGS_ROUTE = "/v1/embeddings"
MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRoutes:
    """A request runs on the model the admission's gate gives it (its vocabulary, embedder and id)."""

    def __init__(self, admission: Admission, *, truncate: bool = False):
        self.admission, self.metrics, self.truncate = admission, admission.metrics, truncate

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(EMBEDDINGS_ROUTE, self.embeddings)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        async with self.admission.serve(body.get("model"), generation=False) as served:
            return await self._embed(body, served)

    async def _embed(self, body: dict, served) -> web.Response:
        inputs = self._inputs(body.get("input"), served.engine.vocab_model.vocab)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid(f"'encoding_format' must be 'float' or 'base64', not {encoding!r}", "encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                       or dimensions < 1):
            raise invalid("'dimensions' must be a positive integer", "dimensions", "invalid_type")
        if not isinstance(body.get("model", ""), str):
            raise invalid("'model' must be a string", "model", "invalid_type")
        info = await self._call(served.embedder.start())
        if dimensions is not None and dimensions != info.n_embd:
            raise invalid(f"this model's embeddings have {info.n_embd} dimensions and it cannot shorten them: "
                          f"leave 'dimensions' out or set it to {info.n_embd}", "dimensions")
        for i, tokens in enumerate(inputs):
            if len(tokens) > info.n_ctx:
                if not self.truncate:
                    raise invalid(f"input[{i}] has {len(tokens)} tokens but an embedding input holds at most "
                                  f"{info.n_ctx}; shorten it (or start the server with --truncate)", "input",
                                  "context_length_exceeded")
                inputs[i] = tokens[:info.n_ctx]  # keep the start, as embedding models are trained
        vectors = await self._call(served.embedder.embed(inputs))
        n_tokens = sum(map(len, inputs))
        self.metrics.embedding_inputs.inc(len(inputs))
        self.metrics.embedding_tokens.inc(n_tokens)
        if encoding == "base64":
            rows = [base64.b64encode(v.astype("<f4", copy=False).tobytes()).decode("ascii") for v in vectors]
        else:
            rows = list(vectors)
        reply = {"object": "list", "model": served.alias,
                 "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
                 "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
        return web.Response(body=orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")

    @staticmethod
    def _inputs(value, vocab) -> list[list[int]]:
        """The request's inputs as token lists (text is tokenized as llama-server does, special tokens
        parsed); a 400 naming what is wrong."""
        shape = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if value is None:
            raise invalid(f"'input' is required: {shape}", "input", "missing")
        if isinstance(value, str) or (isinstance(value, list) and value and all(_is_token(t) for t in value)):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) or isinstance(v, list) for v in value):
            raise invalid(f"'input' must be {shape}", "input", "invalid_type")
        if not value:
            raise invalid("'input' is empty: send at least one string or token list", "input")
        if len(value) > MAX_INPUTS:
            raise invalid(f"'input' has {len(value)} items; at most {MAX_INPUTS} per request", "input")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                item = vocab.tokenize(item, add_special=True, parse_special=True) if item else []
            elif (bad := next((t for t in item if not _is_token(t) or not 0 <= t < vocab.n_tokens), None)) is not None:
                if not _is_token(bad):
                    raise invalid(f"input[{i}] must be a string or a list of token ids (integers), not a list "
                                  f"holding {bad!r}", "input", "invalid_type")
                raise invalid(f"input[{i}] has token id {bad}, outside the vocabulary (0..{vocab.n_tokens - 1})",
                              "input")
            if not item:
                raise invalid(f"input[{i}] is empty: every input needs at least one token", "input")
            out.append(item)
        return out

    @staticmethod
    async def _call(awaitable):
        try:
            return await awaitable
        except EmbedderError as exc:
            raise Refusal("unavailable", str(exc), code="embeddings_unavailable") from None


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

