"""Prompts in the shapes llama-server takes them, as token lists.

A prompt is text, a list of token ids, a list mixing both (text pieces
tokenized in place, the model's BOS only before a leading one), an object
{"prompt_string": ...}, or for embeddings {"content": [{"type": "text", ...}]}
(the text parts joined). A list of such prompts asks for one answer each.
Special tokens written in the text are parsed, as llama-server does.
"""

from __future__ import annotations

from server.refusal import invalid

SHAPES = ("text, a list of token ids, a list mixing text and token ids, or an object with a 'prompt_string'; "
          "a list of those for several")


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompts(value, tokenize, n_vocab: int, param: str = "prompt", *, content_parts: bool = False) -> list[list[int]]:
    """Every prompt of `value` (the field `param`) as tokens; `tokenize(text, add_special)` is the model's
    tokenizer. `content_parts`: objects may carry OpenAI content parts (the embeddings' inputs)."""
    def one(item, label: str) -> list[int]:
        if isinstance(item, dict):
            if "multimodal_data" in item:
                raise invalid(f"'{label}' carries multimodal_data, but this model reads text only", param)
            if content_parts and "content" in item:
                return tokenize(_text_parts(item["content"], f"{label}.content", param), True)
            if "prompt_string" not in item:
                raise invalid(f"'{label}' must be {SHAPES}", param, "invalid_type")
            item, label = item["prompt_string"], f"{label}.prompt_string"
        if isinstance(item, str):
            return tokenize(item, True)
        if not isinstance(item, list) or not all(isinstance(v, str) or _is_token(v) for v in item) or (
                item and not any(_is_token(v) for v in item)):
            raise invalid(f"'{label}' must be {SHAPES}", param, "invalid_type")
        tokens: list[int] = []
        for i, piece in enumerate(item):
            if isinstance(piece, str):
                tokens += tokenize(piece, i == 0)
            elif not 0 <= piece < n_vocab:
                raise invalid(f"'{label}' has token id {piece}, outside the vocabulary (0..{n_vocab - 1})", param)
            else:
                tokens.append(piece)
        return tokens

    if isinstance(value, list) and value and not any(_is_token(v) for v in value):
        return [one(v, f"{param}[{i}]") for i, v in enumerate(value)]
    return [one(value, param)]


def _text_parts(parts, label: str, param: str) -> str:
    if not isinstance(parts, list):
        raise invalid(f"'{label}' must be a list of content parts", param, "invalid_type")
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(f"'{label}[{i}]' is a {kind!r} part; this model reads text parts only "
                          '({"type": "text", "text": ...})', param)
    return "".join(part["text"] for part in parts)
