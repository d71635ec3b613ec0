"""POST /v1/embeddings, shaped exactly like OpenAI's: `input` as a string, a
list of strings, a list of token ids or a list of lists of token ids (and
llama-server's shapes: text and ids mixed, {"content": [text parts]}); vectors
as floats or base64 (little-endian float32); usage counts the input tokens.
POST /embeddings answers in llama-server's own shape, [{index, embedding:
[vector, ...]}], one vector per token with --embeddings-pooling none.
The vectors come from the embedding pool (engine/embedder.py)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
from aiohttp import web

from engine.embedder import EmbedderError
from server import llama_prompts
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
        for path in ("/embeddings", "/embedding"):  # llama-server's (the second its legacy name)
            app.router.add_post(path, self.llama_embeddings)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        async with self.admission.serve(body.get("model"), generation=False) as served:
            if served.embedder.config.pooling == "none":
                raise invalid("Pooling type 'none' is not OpenAI-compatible: /v1/embeddings returns one vector per "
                              "input; POST /embeddings returns the tokens' vectors", "input")
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise invalid(f"'encoding_format' must be 'float' or 'base64', not {encoding!r}", "encoding_format")
            inputs, vectors = await self._vectors(body, served)
        n_tokens = sum(map(len, inputs))
        if encoding == "base64":
            rows = [base64.b64encode(v.astype("<f4", copy=False).tobytes()).decode("ascii") for v in vectors]
        else:
            rows = list(vectors)
        reply = {"object": "list", "model": served.alias,
                 "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
                 "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
        return _json(reply)

    async def llama_embeddings(self, request: web.Request) -> web.Response:
        """llama-server's /embeddings: `input` (or `content`), [{index, embedding: [vector, ...]}]: one vector,
        or with pooling none one per token."""
        body = await read_json(request)
        if "input" not in body and "content" in body:
            body = {**body, "input": body["content"]}
        async with self.admission.serve(body.get("model"), generation=False) as served:
            inputs, vectors = await self._vectors(body, served)
        if served.embedder.config.pooling == "none":
            rows = np.split(vectors, np.cumsum([len(t) for t in inputs])[:-1])
        else:
            rows = vectors[:, None, :]
        return _json([{"index": i, "embedding": row} for i, row in enumerate(rows)])

    async def _vectors(self, body: dict, served) -> tuple[list[list[int]], np.ndarray]:
        """The inputs' tokens and their vectors (counted in the metrics)."""
        inputs = self._inputs(body.get("input"), served.engine)
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
                                  f"{info.n_ctx}: it is too large to process; shorten it (or start the server "
                                  "with --truncate)", "input", "context_length_exceeded")
                inputs[i] = tokens[:info.n_ctx]  # keep the start, as embedding models are trained
        vectors = await self._call(served.embedder.embed(inputs))
        self.metrics.embedding_inputs.inc(len(inputs))
        self.metrics.embedding_tokens.inc(sum(map(len, inputs)))
        return inputs, vectors

    @staticmethod
    def _inputs(value, engine) -> list[list[int]]:
        """The request's inputs as token lists (text is tokenized as llama-server does, special tokens
        parsed); a 400 naming what is wrong."""
        if value is None:
            raise invalid("'input' is required: a string, a list of strings, a list of token ids or a list of "
                          "lists of token ids", "input", "missing")
        if value == []:
            raise invalid("'input' is empty: send at least one string or token list", "input")
        inputs = llama_prompts.prompts(value, lambda text, special: engine.tokenize(text, add_special=special),
                                       engine.vocab_model.vocab.n_tokens, "input", content_parts=True)
        if len(inputs) > MAX_INPUTS:
            raise invalid(f"'input' has {len(inputs)} items; at most {MAX_INPUTS} per request", "input")
        for i, item in enumerate(inputs):
            if not item:
                raise invalid(f"input[{i}] is empty: every input needs at least one token", "input")
        return inputs

    @staticmethod
    async def _call(awaitable):
        try:
            return await awaitable
        except EmbedderError as exc:
            raise Refusal("unavailable", str(exc), code="embeddings_unavailable") from None


def _json(body) -> web.Response:
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json")

