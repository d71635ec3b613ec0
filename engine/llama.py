"""Python owners of llama.cpp's native objects: Model, Vocab, LoraAdapter, Context, Batch
(SamplerChain: engine/sampler_chain.py).

Each class frees its native resource exactly once (close() is idempotent and
the classes are context managers) and turns llama.cpp's sentinel return values
into exceptions that say what went wrong.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.llama_cpp import (
    FLASH_ATTN_AUTO, FLASH_ATTN_DISABLED, FLASH_ATTN_ENABLED, KV_CACHE_TYPES, POOLING_TYPES, TOKEN_ATTR_CONTROL, lib,
    llama_batch, llama_token, take_errors,
)


_POOLING_NAMES = {value: name for name, value in POOLING_TYPES.items()}


class LlamaError(RuntimeError):
    """A llama.cpp call failed; the message explains the return code."""


_DECODE_ERRORS = {
    1: "no KV cache slot for the batch (context full: reduce the batch or raise ctx_size)",
    2: "decode aborted",
    -1: "invalid input batch (token id out of range, bad position or sequence id)",
}


def version() -> str:
    """libllama's version string (llama-server's build_info names it)."""
    return lib.llama_version().decode()


def supports_gpu_offload() -> bool:
    return bool(lib.llama_supports_gpu_offload())


def max_parallel_sequences() -> int:
    return int(lib.llama_max_parallel_sequences())


class _Owner:
    """Holds one native pointer and frees it once, on close() or exit."""

    _free = None  # the llama.cpp function that frees the pointer

    def __init__(self, ptr: int | None, what: str):
        if not ptr:
            raise LlamaError(what)
        self._ptr = ptr

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise LlamaError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            type(self)._free(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            self.close()


class Model(_Owner):
    """A loaded GGUF model (or only its vocabulary, with vocab_only=True)."""

    _free = lib.llama_model_free

    def __init__(self, path: str | Path, *, vocab_only: bool = False, n_gpu_layers: int = -1):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        params = lib.llama_model_default_params()
        params.vocab_only = vocab_only
        params.n_gpu_layers = n_gpu_layers
        super().__init__(lib.llama_model_load_from_file(str(path).encode(), params),
                         f"llama.cpp could not load {path} (not a GGUF model, or an architecture this build does not know)")
        self.path = path
        self.vocab = Vocab(lib.llama_model_get_vocab(self._ptr), self)

    def chat_template(self, name: str | None = None) -> str | None:
        """The GGUF's chat template, or its template `name` (e.g. "rerank")."""
        tmpl = lib.llama_model_chat_template(self.ptr, name.encode() if name else None)
        return tmpl.decode() if tmpl else None

    def meta(self, key: str) -> str | None:
        buf = C.create_string_buffer(256)
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = C.create_string_buffer(n + 1)
            lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    # the sampling a model's authors recommend, as recent converters write it into the GGUF
    _RECOMMENDED = {"temperature": ("general.sampling.temp", float), "top_k": ("general.sampling.top_k", int),
                    "top_p": ("general.sampling.top_p", float), "min_p": ("general.sampling.min_p", float),
                    "repeat_penalty": ("general.sampling.penalty_repeat", float),
                    "repeat_last_n": ("general.sampling.penalty_last_n", int)}

    def recommended_sampling(self) -> dict:
        """{temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n} the GGUF recommends (those it has)."""
        out = {}
        for name, (key, kind) in self._RECOMMENDED.items():
            value = self.meta(key)
            if value is not None:
                try:
                    out[name] = kind(float(value))
                except ValueError:
                    pass
        return out

    @property
    def n_ctx_train(self) -> int:
        """The context the model was trained with (from the GGUF's header for a vocab-only model, whose
        hyperparameters llama.cpp leaves at 0)."""
        return lib.llama_model_n_ctx_train(self.ptr) or self._arch_number("context_length", 0)

    def _arch_number(self, key: str, default: int) -> int:
        """An integer of the GGUF's `<architecture>.<key>` header field, else `default`."""
        value = self.meta(f"{self.meta('general.architecture')}.{key}")
        return int(value) if value is not None and value.isdigit() else default

    @property
    def n_embd(self) -> int:
        return lib.llama_model_n_embd(self.ptr)

    def kv_bytes_per_cell(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """What one KV cell costs with these cache types: a key and a value per layer, as wide as the
        model's KV heads, from the GGUF's header (a vocab-only model has no layers to ask)."""
        n_head = max(1, self._arch_number("attention.head_count", 1))
        n_head_kv = self._arch_number("attention.head_count_kv", n_head)
        head = self._arch_number("attention.key_length", self._arch_number("embedding_length", 0) // n_head)
        width = n_head_kv * head
        return self._arch_number("block_count", 1) * (kv_type_bytes(type_k, width) + kv_type_bytes(type_v, width))

    @property
    def n_embd_out(self) -> int:
        """Width of the model's output embeddings (n_embd for most models)."""
        return lib.llama_model_n_embd_out(self.ptr)

    @property
    def n_cls_out(self) -> int:
        """Scores a classifier (rank) head gives per sequence (1 for a reranker)."""
        return lib.llama_model_n_cls_out(self.ptr)

    def pooling(self) -> str | None:
        """The pooling the GGUF declares for embeddings (mean, cls, last, none, rank), or None."""
        value = self.meta(f"{self.meta('general.architecture')}.pooling_type")
        return _POOLING_NAMES.get(int(value)) if value is not None and value.lstrip("-").isdigit() else None



def kv_type_bytes(name: str, n: int) -> int:
    """Bytes that n values take in a KV cache of this type (a KV_CACHE_TYPES name)."""
    _, block_bytes, block_values = KV_CACHE_TYPES[name]
    return -(-n // block_values) * block_bytes


class LoraAdapter(_Owner):
    """A GGUF LoRA adapter loaded for one model. llama.cpp frees the adapters a model still holds
    when the model is freed, so close an adapter before its model (and after no context applies it);
    one whose model closed first is already gone and is only forgotten here."""

    _free = lib.llama_adapter_lora_free

    def __init__(self, model: Model, path: str | Path):
        self.model, self.path = model, Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"the file {self.path.name} is not there")
        take_errors()
        ptr = lib.llama_adapter_lora_init(model.ptr, str(self.path).encode())
        why = "; ".join(take_errors()) if not ptr else ""
        super().__init__(ptr, f"llama.cpp could not load {self.path.name}: {why or 'not a LoRA adapter for it'}")

    def close(self) -> None:
        if self._ptr is not None and self.model._ptr is None:  # freed with its model
            self._ptr = None
        super().close()


class Vocab:
    """Tokenizer and special tokens of a model (lives as long as its Model)."""

    def __init__(self, ptr: int, model: Model):
        self._ptr, self._model = ptr, model
        self.n_tokens = lib.llama_vocab_n_tokens(ptr)
        self.type = lib.llama_vocab_type(ptr)  # SPM, BPE, WPM, ...: how text becomes tokens
        self.bos = lib.llama_vocab_bos(ptr)
        self.eos = lib.llama_vocab_eos(ptr)
        self.eot = lib.llama_vocab_eot(ptr)
        self.sep = lib.llama_vocab_sep(ptr)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(ptr))
        self.add_eos = bool(lib.llama_vocab_get_add_eos(ptr))
        self.add_sep = bool(lib.llama_vocab_get_add_sep(ptr))
        self._piece = C.create_string_buffer(256)

    @property
    def ptr(self) -> int:
        self._model.ptr  # raises if the model was closed
        return self._ptr

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.ptr, token))

    def is_control(self, token: int) -> bool:
        """A special token (end of turn, role marker) rather than a piece of text."""
        return bool(lib.llama_vocab_get_attr(self.ptr, token) & TOKEN_ATTR_CONTROL)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (llama_token * cap)()
        n = lib.llama_tokenize(self.ptr, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            if n == -(2**31):
                raise LlamaError("text too long to tokenize")
            cap = -n
            buf = (llama_token * cap)()
            n = lib.llama_tokenize(self.ptr, raw, len(raw), buf, cap, add_special, parse_special)
        return buf[:n]

    def text(self, token: int) -> bytes:
        """The token's text as the GGUF stores it (before any byte decoding)."""
        return lib.llama_vocab_get_text(self.ptr, token) or b""

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""
        n = lib.llama_token_to_piece(self.ptr, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            big = C.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.ptr, token, big, len(big), 0, special)
            return big.raw[:n]
        return self._piece.raw[:n]

    def detokenize(self, tokens: list[int], *, remove_special: bool = False, unparse_special: bool = False) -> str:
        if not tokens:
            return ""
        arr = (llama_token * len(tokens))(*tokens)
        cap = max(16, len(tokens) * 8)
        buf = C.create_string_buffer(cap)
        n = lib.llama_detokenize(self.ptr, arr, len(tokens), buf, cap, remove_special, unparse_special)
        if n < 0:
            buf = C.create_string_buffer(-n)
            n = lib.llama_detokenize(self.ptr, arr, len(tokens), buf, -n, remove_special, unparse_special)
        return buf.raw[:n].decode("utf-8", "replace")

    def check_token(self, token: int) -> None:
        if not 0 <= token < self.n_tokens:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.n_tokens - 1})")


@dataclass
class ContextParams:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_threads: int = 2
    kv_unified: bool = True
    flash_attn: str = "auto"  # auto | on | off
    offload_kqv: bool = True  # the KV cache and attention of GPU layers on the GPU
    type_k: str = "f16"       # KV cache types (KV_CACHE_TYPES names); a quantized V needs flash attention
    type_v: str = "f16"
    embeddings: bool = False  # output embeddings (pooled per sequence unless pooling is "none")
    pooling: str = "unspecified"  # a POOLING_TYPES name; unspecified = what the model declares


class Context(_Owner):
    """A llama_context: KV cache plus compute buffers for decoding batches."""

    _free = lib.llama_free

    def __init__(self, model: Model, params: ContextParams):
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = params.n_ctx, params.n_batch, params.n_ubatch
        p.n_seq_max = params.n_seq_max
        p.n_threads = p.n_threads_batch = params.n_threads
        p.kv_unified = params.kv_unified
        p.offload_kqv = params.offload_kqv
        p.flash_attn_type = {"auto": FLASH_ATTN_AUTO, "on": FLASH_ATTN_ENABLED, "off": FLASH_ATTN_DISABLED}[params.flash_attn]
        p.type_k, p.type_v = KV_CACHE_TYPES[params.type_k][0], KV_CACHE_TYPES[params.type_v][0]
        p.embeddings = params.embeddings
        p.pooling_type = POOLING_TYPES[params.pooling]
        super().__init__(lib.llama_init_from_model(model.ptr, p),
                         f"llama.cpp could not create a context ({params}); see its log for why (often: out of memory)")
        self.model = model
        self.n_ctx = lib.llama_n_ctx(self._ptr)
        self.n_ctx_seq = lib.llama_n_ctx_seq(self._ptr)  # n_ctx, or each sequence's share when not unified
        self.n_batch = lib.llama_n_batch(self._ptr)
        self.n_seq_max = lib.llama_n_seq_max(self._ptr)
        self.n_vocab = model.vocab.n_tokens
        self._memory = lib.llama_get_memory(self._ptr)

    def decode(self, batch: "Batch") -> None:
        rc = lib.llama_decode(self.ptr, batch.struct)
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc}: {_DECODE_ERRORS.get(rc, 'fatal error in the compute graph')}")

    def logits(self, n_rows: int) -> np.ndarray:
        """The output rows of the last decode, as a [n_rows, n_vocab] view (valid until the next decode)."""
        ptr = lib.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))

    def logits_row(self, i: int) -> np.ndarray:
        """Logits of batch position i (which must have requested output)."""
        ptr = lib.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise LlamaError(f"no logits for batch row {i}: it did not request output")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    @property
    def pooling(self) -> str:
        """How this context pools embeddings (a POOLING_TYPES name)."""
        return _POOLING_NAMES[lib.llama_pooling_type(self.ptr)]

    def token_embedding(self, i: int) -> np.ndarray:
        """The embedding of batch position i of the last decode (pooling none; a view, valid until the next
        decode)."""
        ptr = lib.llama_get_embeddings_ith(self.ptr, i)
        if not ptr:
            raise LlamaError(f"no embedding for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd_out,))

    def seq_embedding(self, seq: int) -> np.ndarray:
        """The pooled embedding of sequence `seq` from the last decode (a view, valid until the next decode)."""
        ptr = lib.llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise LlamaError(f"no pooled embedding for sequence {seq} (not in the last batch, or pooling is none)")
        width = self.model.n_cls_out if self.pooling == "rank" else self.model.n_embd_out  # rank: the head's scores
        return np.ctypeslib.as_array(ptr, shape=(width,))

    def set_adapters(self, adapters: list[tuple[LoraAdapter, float]]) -> None:
        """Apply these LoRA adapters at these scales to the decodes that follow ([] = the base model).
        llama.cpp re-plans its compute graph when the set changes and does nothing when it is the same."""
        n = len(adapters)
        ptrs = (C.c_void_p * n)(*[a.ptr for a, _ in adapters]) if n else None
        scales = (C.c_float * n)(*[s for _, s in adapters]) if n else None
        lib.llama_set_adapters_lora(self.ptr, ptrs, n, scales)

    # --- KV cache (memory) ---
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        if not lib.llama_memory_seq_rm(self._memory_ptr(), seq, p0, p1):
            raise LlamaError(f"cannot remove positions [{p0}, {p1}) of sequence {seq} from this memory type")

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        lib.llama_memory_seq_cp(self._memory_ptr(), src, dst, p0, p1)


    def seq_pos_max(self, seq: int) -> int:
        return lib.llama_memory_seq_pos_max(self._memory_ptr(), seq)

    def clear(self) -> None:
        lib.llama_memory_clear(self._memory_ptr(), True)

    def _memory_ptr(self) -> int:
        self.ptr  # raises if closed
        return self._memory

    # --- state ---
    def seq_state(self, seq: int) -> bytes:
        size = lib.llama_state_seq_get_size(self.ptr, seq)
        buf = C.create_string_buffer(size)
        n = lib.llama_state_seq_get_data(self.ptr, buf, size, seq)
        return buf.raw[:n]

    def set_seq_state(self, seq: int, state: bytes) -> None:
        if lib.llama_state_seq_set_data(self.ptr, state, len(state), seq) == 0:
            raise LlamaError(f"could not restore the state of sequence {seq} (not enough KV cells, or another model)")

    def save_seq_file(self, path: str, seq: int, tokens: list[int]) -> int:
        """Write sequence `seq`'s KV state and its tokens to `path` (llama.cpp's state file); the bytes."""
        arr = (llama_token * len(tokens))(*tokens)
        n = lib.llama_state_seq_save_file(self.ptr, path.encode(), seq, arr, len(tokens))
        if n == 0:
            raise LlamaError(f"could not save the state of sequence {seq} to {path}")
        return n

    def load_seq_file(self, path: str, seq: int, capacity: int) -> int:
        """Load a state file's KV into sequence `seq`; the number of tokens it holds."""
        arr, count = (llama_token * max(1, capacity))(), C.c_size_t()
        if lib.llama_state_seq_load_file(self.ptr, path.encode(), seq, arr, capacity, C.byref(count)) == 0:
            raise LlamaError(f"could not load {path} into sequence {seq} (another model, or not enough KV cells)")
        return count.value


class Batch:
    """A llama_batch whose arrays are numpy arrays (or views over shared memory).

    Each token belongs to one sequence; the seq_id pointer table is built once,
    so filling a batch is plain numpy assignment with no per-step allocation.
    """

    def __init__(self, capacity: int, *, token=None, pos=None, seq=None, logits=None):
        def arr(given, dtype):
            return given if given is not None else np.zeros(capacity, dtype)
        self.token = arr(token, np.int32)
        self.pos = arr(pos, np.int32)
        self.seq = arr(seq, np.int32)
        self.logits = arr(logits, np.int8)
        self.capacity = capacity
        self._n_seq_id = np.ones(capacity, np.int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = np.arange(capacity, dtype=np.uintp) * self.seq.itemsize + base
        self.struct = llama_batch(
            0,
            self.token.ctypes.data_as(C.POINTER(C.c_int32)),
            None,
            self.pos.ctypes.data_as(C.POINTER(C.c_int32)),
            self._n_seq_id.ctypes.data_as(C.POINTER(C.c_int32)),
            self._seq_ptrs.ctypes.data_as(C.POINTER(C.POINTER(C.c_int32))),
            self.logits.ctypes.data_as(C.POINTER(C.c_int8)),
        )

    @property
    def n_tokens(self) -> int:
        return self.struct.n_tokens

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        if not 0 <= n <= self.capacity:
            raise ValueError(f"batch of {n} tokens does not fit capacity {self.capacity}")
        self.struct.n_tokens = n

    def set(self, tokens, seq: int, start_pos: int, *, output_last: bool = True) -> None:
        """Fill the batch with one sequence's tokens (one prompt, one sequence: tests, simple callers)."""
        n = len(tokens)
        self.n_tokens = n
        self.token[:n] = tokens
        self.pos[:n] = np.arange(start_pos, start_pos + n)
        self.seq[:n] = seq
        self.logits[:n] = 0
        if output_last:
            self.logits[n - 1] = 1
