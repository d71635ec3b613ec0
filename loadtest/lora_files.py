"""GGUF LoRA adapters made from random low-rank matrices, for the LoRA tests and benchmark: an
adapter that visibly changes a model's answers without any fine-tuning. Written with the `gguf`
package (the gguf-py of the llama.cpp source build_llama.sh pins, released on PyPI) in the layout
llama.cpp's convert_lora_to_gguf.py writes: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and for each adapted weight `<weight name>.lora_a` (rank x inputs) and
`.lora_b` (outputs x rank)."""

from __future__ import annotations

import zlib
from pathlib import Path

import gguf
import numpy as np

TARGETS = ("attn_q", "attn_v", "ffn_up")  # the query, value and up projections of every layer


def make_adapters(model_path: str | Path, out_dir: str | Path, names: list[str], *, rank: int = 8,
                  strength: float = 1.0, targets: tuple[str, ...] = TARGETS) -> list[Path]:
    """`<out_dir>/<name>.gguf` for each name: a LoRA adapter for the model at `model_path` (any
    architecture whose weights are named blk.N.<target>.weight), seeded by its name. Each target weight
    W gets dW = B A with entries of standard deviation strength / sqrt(inputs), so an input x moves each
    output by about strength x rms(x); alpha = rank (scale 1)."""
    reader = gguf.GGUFReader(str(model_path))
    arch = reader.fields["general.architecture"].contents()
    weights = []
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in targets and parts[3] == "weight":
            weights.append((tensor.name, int(tensor.shape[0]), int(tensor.shape[1])))  # ggml order: inputs first
    paths = []
    for name in names:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        path = Path(out_dir) / f"{name}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        for weight, n_in, n_out in weights:
            # float32: llama.cpp loads F64 adapters but crashes when it multiplies with them
            a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            b = (rng.standard_normal((n_out, rank)) * (strength / np.sqrt(rank))).astype(np.float32)
            writer.add_tensor(f"{weight}.lora_a", a)
            writer.add_tensor(f"{weight}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(path)
    return paths
