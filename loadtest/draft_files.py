"""GGUF draft models made offline from the model itself, for the draft-model tests and benchmark
(engine/draft_model.py), written with the `gguf` package: a copy keeping only the first layers (a
self-speculative draft: same vocabulary, a fraction of the cost), and a copy whose vocabulary differs
in one token (which the service must refuse). Nothing here is committed as a model file."""

from __future__ import annotations

from pathlib import Path

import gguf


def derived_model(src: str | Path, dst: str | Path, *, layers: int | None = None,
                  token_texts: dict[int, str] | None = None, tensors: bool = True) -> Path:
    """A copy of the GGUF model `src` at `dst`: with its first `layers` blocks only (block_count changed,
    the later blk.N tensors left out), with the tokens of `token_texts` renamed, or without tensors at
    all (enough for a vocab-only load: a vocabulary check)."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer's own
        value = field.contents()
        if name == f"{arch}.block_count" and layers is not None:
            value = layers
        elif name == "tokenizer.ggml.tokens" and token_texts:
            value = [token_texts.get(i, text) for i, text in enumerate(value)]
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    kept = []
    for t in reader.tensors if tensors else ():
        parts = t.name.split(".")
        if layers is not None and parts[0] == "blk" and int(parts[1]) >= layers:
            continue
        kept.append(t)
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()
    return Path(dst)


if __name__ == "__main__":  # python loadtest/draft_files.py MODEL OUT LAYERS: a self-speculative draft
    import sys
    print(derived_model(sys.argv[1], sys.argv[2], layers=int(sys.argv[3])))
