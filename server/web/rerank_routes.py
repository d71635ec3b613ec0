"""llama-server's reranking (/rerank, /v1/rerank and their /reranking twins, Jina's and
Cohere's shape; TEI's with `texts`): each document is scored against the query by
the model's rank head in the embedding pool (--reranking: rank pooling), the
best first. The pair is the GGUF's "rerank" template with {query} and {document},
else query and document as llama-server joins them (BOS, EOS, SEP where the
vocabulary adds them)."""

from __future__ import annotations

from aiohttp import web

from engine.embedder import EmbedderError
from server.admission import Admission
from server.fields import Fields
from server.refusal import Refusal, invalid
from server.settings import ServerSettings
from server.web.errors import json_response, read_json


class RerankRoutes:
    def __init__(self, admission: Admission, settings: ServerSettings):
        self.admission, self.settings = admission, settings

    def add_to(self, app: web.Application) -> None:
        for path in ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking"):
            app.router.add_post(path, self.rerank)

    async def rerank(self, request: web.Request) -> web.Response:
        if not self.settings.reranking:
            raise Refusal("not_supported", "This server does not support reranking. Start it with `--reranking`.",
                          code="not_supported")
        body = await read_json(request)
        f = Fields(body)
        tei = "texts" in body
        field = "texts" if tei else "documents"
        query, documents = f.text("query"), body.get(field)
        if query is None:
            raise invalid("'query' is required", "query", "missing_required_parameter")
        if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
            raise invalid(f"'{field}' must be a non-empty list of strings", field, "invalid_type")
        top_n = f.number("top_n", len(documents), lo=0, integer=True)
        return_text = tei and f.flag("return_text")
        async with self.admission.serve(body.get("model"), generation=False) as served:
            pairs = [pair_tokens(served.engine.vocab_model, query, d) for d in documents]
            try:
                longest = (await served.embedder.start()).n_ctx
                for i, pair in enumerate(pairs):
                    if not pair or len(pair) > longest:
                        raise invalid(f"query and {field}[{i}] have {len(pair)} tokens together; a pair needs 1 to "
                                      f"{longest} (--embeddings-ctx-size)", field)
                scores = await served.embedder.embed(pairs)
            except EmbedderError as exc:
                raise Refusal("unavailable", str(exc), code="embeddings_unavailable") from None
        label = "score" if tei else "relevance_score"
        results = sorted(({"index": i, label: float(s[0]), **({"text": documents[i]} if return_text else {})}
                          for i, s in enumerate(scores)), key=lambda r: -r[label])[:top_n]
        if tei:
            return json_response(results)
        n = sum(map(len, pairs))
        return json_response({"model": served.alias, "object": "list", "usage": {"prompt_tokens": n,
                                                                                 "total_tokens": n},
                              "results": results})


def pair_tokens(model, query: str, document: str) -> list[int]:
    """The tokens of one (query, document) pair, as llama-server builds them."""
    vocab = model.vocab
    template = model.chat_template("rerank")
    if template:
        return vocab.tokenize(template.replace("{query}", query).replace("{document}", document), add_special=False)
    eos = vocab.eos if vocab.eos >= 0 else vocab.sep
    tokens = [vocab.bos] if vocab.add_bos else []
    tokens += vocab.tokenize(query, add_special=False, parse_special=False)
    tokens += [eos] if vocab.add_eos else []
    tokens += [vocab.sep] if vocab.add_sep else []
    tokens += vocab.tokenize(document, add_special=False, parse_special=False)
    return tokens + ([eos] if vocab.add_eos else [])
