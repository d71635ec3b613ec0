"""ctypes declarations of the part of llama.h the engine uses.

This is the only module that knows llama.h: struct layouts (checked against
the C compiler by native/abi_probe.c and tests/test_abi.py), function
prototypes, and where the shared library lives. `engine.llama` wraps it in
classes that own native resources; nothing else imports this module.
"""

from __future__ import annotations

import collections
import ctypes as C
import logging
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIB = ROOT / "native" / "build" / "bin" / "libllama.so"

# --- types -------------------------------------------------------------------
llama_token = C.c_int32
llama_pos = C.c_int32
llama_seq_id = C.c_int32
p_model = C.c_void_p
p_vocab = C.c_void_p
p_context = C.c_void_p
p_sampler = C.c_void_p
p_memory = C.c_void_p
p_adapter = C.c_void_p   # struct llama_adapter_lora *
log_callback = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)
progress_callback = C.CFUNCTYPE(C.c_bool, C.c_float, C.c_void_p)

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_STATE_SEQ_MAGIC, LLAMA_STATE_SEQ_VERSION = 0x67677371, 3  # 'ggsq': a sequence's state file
FLASH_ATTN_AUTO, FLASH_ATTN_DISABLED, FLASH_ATTN_ENABLED = -1, 0, 1
# what a KV cache may hold (llama-server's --cache-type-k/-v): name -> (enum ggml_type, bytes per block, values per block)
KV_CACHE_TYPES = {"f32": (0, 4, 1), "f16": (1, 2, 1), "bf16": (30, 2, 1), "q8_0": (8, 34, 32), "q4_0": (2, 18, 32),
                  "q4_1": (3, 20, 32), "iq4_nl": (20, 18, 32), "q5_0": (6, 22, 32), "q5_1": (7, 24, 32)}
POOLING_TYPES = {"unspecified": -1, "none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}  # enum llama_pooling_type
TOKEN_ATTR_CONTROL = 1 << 3  # enum llama_token_attr: a special token (end of turn, role markers)
GGML_LOG_LEVEL_DEBUG, GGML_LOG_LEVEL_INFO, GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 1, 2, 3, 4, 5


class llama_model_params(C.Structure):
    _fields_ = [
        ("devices", C.c_void_p),
        ("tensor_buft_overrides", C.c_void_p),
        ("n_gpu_layers", C.c_int32),
        ("split_mode", C.c_int),
        ("load_mode", C.c_int),
        ("lazy_mode", C.c_int),
        ("main_gpu", C.c_int32),
        ("tensor_split", C.POINTER(C.c_float)),
        ("progress_callback", progress_callback),
        ("progress_callback_user_data", C.c_void_p),
        ("kv_overrides", C.c_void_p),
        ("vocab_only", C.c_bool),
        ("check_tensors", C.c_bool),
        ("use_extra_bufts", C.c_bool),
        ("no_host", C.c_bool),
        ("no_alloc", C.c_bool),
        ("load_mtp", C.c_bool),
    ]


class llama_context_params(C.Structure):
    _fields_ = [
        ("n_ctx", C.c_uint32),
        ("n_batch", C.c_uint32),
        ("n_ubatch", C.c_uint32),
        ("n_seq_max", C.c_uint32),
        ("n_rs_seq", C.c_uint32),
        ("n_outputs_max", C.c_uint32),
        ("n_outputs_max_per_seq", C.c_uint32),
        ("n_threads", C.c_int32),
        ("n_threads_batch", C.c_int32),
        ("ctx_type", C.c_int),
        ("rope_scaling_type", C.c_int),
        ("pooling_type", C.c_int),
        ("attention_type", C.c_int),
        ("flash_attn_type", C.c_int),
        ("rope_freq_base", C.c_float),
        ("rope_freq_scale", C.c_float),
        ("yarn_ext_factor", C.c_float),
        ("yarn_attn_factor", C.c_float),
        ("yarn_beta_fast", C.c_float),
        ("yarn_beta_slow", C.c_float),
        ("yarn_orig_ctx", C.c_uint32),
        ("defrag_thold", C.c_float),
        ("cb_eval", C.c_void_p),
        ("cb_eval_user_data", C.c_void_p),
        ("type_k", C.c_int),
        ("type_v", C.c_int),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        ("embeddings", C.c_bool),
        ("offload_kqv", C.c_bool),
        ("no_perf", C.c_bool),
        ("op_offload", C.c_bool),
        ("swa_full", C.c_bool),
        ("kv_unified", C.c_bool),
        ("samplers", C.c_void_p),
        ("n_samplers", C.c_size_t),
        ("ctx_other", C.c_void_p),
    ]


class llama_batch(C.Structure):
    _fields_ = [
        ("n_tokens", C.c_int32),
        ("token", C.POINTER(llama_token)),
        ("embd", C.POINTER(C.c_float)),
        ("pos", C.POINTER(llama_pos)),
        ("n_seq_id", C.POINTER(C.c_int32)),
        ("seq_id", C.POINTER(C.POINTER(llama_seq_id))),
        ("logits", C.POINTER(C.c_int8)),
    ]


class llama_sampler_chain_params(C.Structure):
    _fields_ = [("no_perf", C.c_bool)]


class llama_chat_message(C.Structure):
    _fields_ = [("role", C.c_char_p), ("content", C.c_char_p)]


class llama_token_data(C.Structure):
    _fields_ = [("id", llama_token), ("logit", C.c_float), ("p", C.c_float)]


class llama_token_data_array(C.Structure):
    _fields_ = [
        ("data", C.POINTER(llama_token_data)),
        ("size", C.c_size_t),
        ("selected", C.c_int64),
        ("sorted", C.c_bool),
    ]


class llama_logit_bias(C.Structure):
    _fields_ = [("token", llama_token), ("bias", C.c_float)]


class llama_perf_context_data(C.Structure):
    _fields_ = [
        ("t_start_ms", C.c_double),
        ("t_load_ms", C.c_double),
        ("t_p_eval_ms", C.c_double),
        ("t_eval_ms", C.c_double),
        ("n_p_eval", C.c_int32),
        ("n_eval", C.c_int32),
        ("n_reused", C.c_int32),
    ]


STRUCTS = [
    llama_model_params, llama_context_params, llama_batch, llama_sampler_chain_params,
    llama_chat_message, llama_token_data, llama_token_data_array, llama_logit_bias,
    llama_perf_context_data,
]

# --- functions: name -> (argtypes, restype) ------------------------------------
_b, _i32, _u32, _f, _sz, _s = C.c_bool, C.c_int32, C.c_uint32, C.c_float, C.c_size_t, C.c_char_p
_PROTOTYPES = {
    "llama_backend_init": ([], None),
    "llama_log_set": ([log_callback, C.c_void_p], None),
    "llama_version": ([], _s),
    "llama_print_system_info": ([], _s),
    "llama_supports_gpu_offload": ([], _b),
    "llama_max_parallel_sequences": ([], _sz),
    "llama_model_default_params": ([], llama_model_params),
    "llama_context_default_params": ([], llama_context_params),
    "llama_sampler_chain_default_params": ([], llama_sampler_chain_params),
    # model
    "llama_model_load_from_file": ([_s, llama_model_params], p_model),
    "llama_model_free": ([p_model], None),
    "llama_model_get_vocab": ([p_model], p_vocab),
    "llama_model_chat_template": ([p_model, _s], _s),
    "llama_model_n_ctx_train": ([p_model], _i32),
    "llama_model_n_embd": ([p_model], _i32),
    "llama_model_n_embd_out": ([p_model], _i32),
    "llama_model_n_cls_out": ([p_model], _u32),
    "llama_model_n_params": ([p_model], C.c_uint64),
    "llama_model_size": ([p_model], C.c_uint64),
    "llama_model_desc": ([p_model, C.c_char_p, _sz], _i32),
    "llama_model_meta_val_str": ([p_model, _s, C.c_char_p, _sz], _i32),
    # context
    "llama_init_from_model": ([p_model, llama_context_params], p_context),
    "llama_free": ([p_context], None),
    "llama_n_ctx": ([p_context], _u32),
    "llama_n_ctx_seq": ([p_context], _u32),
    "llama_n_batch": ([p_context], _u32),
    "llama_n_seq_max": ([p_context], _u32),
    "llama_get_memory": ([p_context], p_memory),
    "llama_decode": ([p_context, llama_batch], _i32),
    "llama_get_logits": ([p_context], C.POINTER(C.c_float)),
    "llama_get_logits_ith": ([p_context, _i32], C.POINTER(C.c_float)),
    "llama_pooling_type": ([p_context], C.c_int),
    "llama_get_embeddings_seq": ([p_context, llama_seq_id], C.POINTER(C.c_float)),
    "llama_get_embeddings_ith": ([p_context, _i32], C.POINTER(C.c_float)),
    "llama_perf_context": ([p_context], llama_perf_context_data),
    "llama_perf_context_reset": ([p_context], None),
    # LoRA adapters: an adapter is valid while its model lives; setting the same set again changes nothing
    "llama_adapter_lora_init": ([p_model, _s], p_adapter),
    "llama_adapter_lora_free": ([p_adapter], None),
    "llama_set_adapters_lora": ([p_context, C.POINTER(p_adapter), _sz, C.POINTER(_f)], _i32),
    # memory (KV cache)
    "llama_memory_clear": ([p_memory, _b], None),
    "llama_memory_seq_rm": ([p_memory, llama_seq_id, llama_pos, llama_pos], _b),
    "llama_memory_seq_cp": ([p_memory, llama_seq_id, llama_seq_id, llama_pos, llama_pos], None),
    "llama_memory_seq_keep": ([p_memory, llama_seq_id], None),
    "llama_memory_seq_pos_max": ([p_memory, llama_seq_id], llama_pos),
    # state
    "llama_state_seq_get_size": ([p_context, llama_seq_id], _sz),
    "llama_state_seq_get_data": ([p_context, C.c_void_p, _sz, llama_seq_id], _sz),
    "llama_state_seq_set_data": ([p_context, C.c_void_p, _sz, llama_seq_id], _sz),
    "llama_state_seq_save_file": ([p_context, _s, llama_seq_id, C.POINTER(llama_token), _sz], _sz),
    "llama_state_seq_load_file": ([p_context, _s, llama_seq_id, C.POINTER(llama_token), _sz, C.POINTER(_sz)], _sz),
    # vocab
    "llama_vocab_n_tokens": ([p_vocab], _i32),
    "llama_vocab_type": ([p_vocab], C.c_int),
    "llama_vocab_get_text": ([p_vocab, llama_token], _s),
    "llama_vocab_bos": ([p_vocab], llama_token),
    "llama_vocab_eos": ([p_vocab], llama_token),
    "llama_vocab_eot": ([p_vocab], llama_token),
    "llama_vocab_is_eog": ([p_vocab, llama_token], _b),
    "llama_vocab_get_add_bos": ([p_vocab], _b),
    "llama_vocab_get_attr": ([p_vocab, llama_token], C.c_int),
    "llama_vocab_get_add_eos": ([p_vocab], _b),
    "llama_vocab_get_add_sep": ([p_vocab], _b),
    "llama_vocab_sep": ([p_vocab], llama_token),
    "llama_tokenize": ([p_vocab, C.c_char_p, _i32, C.POINTER(llama_token), _i32, _b, _b], _i32),
    "llama_token_to_piece": ([p_vocab, llama_token, C.c_char_p, _i32, _i32, _b], _i32),
    "llama_detokenize": ([p_vocab, C.POINTER(llama_token), _i32, C.c_char_p, _i32, _b, _b], _i32),
    "llama_chat_apply_template": ([_s, C.POINTER(llama_chat_message), _sz, _b, C.c_char_p, _i32], _i32),
    "llama_chat_builtin_templates": ([C.POINTER(_s), _sz], _i32),
    # samplers
    "llama_sampler_chain_init": ([llama_sampler_chain_params], p_sampler),
    "llama_sampler_chain_add": ([p_sampler, p_sampler], None),
    "llama_sampler_chain_n": ([p_sampler], _i32),
    "llama_sampler_free": ([p_sampler], None),
    "llama_sampler_sample": ([p_sampler, p_context, _i32], llama_token),
    "llama_sampler_accept": ([p_sampler, llama_token], None),
    "llama_sampler_reset": ([p_sampler], None),
    "llama_sampler_init_greedy": ([], p_sampler),
    "llama_sampler_init_dist": ([_u32], p_sampler),
    "llama_sampler_init_top_k": ([_i32], p_sampler),
    "llama_sampler_init_top_p": ([_f, _sz], p_sampler),
    "llama_sampler_init_min_p": ([_f, _sz], p_sampler),
    "llama_sampler_init_typical": ([_f, _sz], p_sampler),
    "llama_sampler_init_temp": ([_f], p_sampler),
    "llama_sampler_init_penalties": ([_i32, _i32, _f, _f, _f], p_sampler),
    "llama_sampler_init_logit_bias": ([_i32, _i32, C.POINTER(llama_logit_bias)], p_sampler),
}


def library_path() -> Path:
    """The libllama to load: $SENTIRIC_LLAMA_LIB, else the build_llama.sh output."""
    return Path(os.environ.get("SENTIRIC_LLAMA_LIB") or DEFAULT_LIB)


def _load() -> C.CDLL:
    path = library_path()
    if not path.exists():
        raise RuntimeError(
            f"libllama not found at {path}: run ./build_llama.sh (or set SENTIRIC_LLAMA_LIB=/path/libllama.so)")
    try:
        lib = C.CDLL(str(path))
    except OSError as exc:
        raise RuntimeError(f"cannot load {path}: {exc} (a CUDA build needs the CUDA runtime; "
                           "rebuild with ./build_llama.sh for the CPU)") from exc
    for name, (argtypes, restype) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


lib = _load()

# --- logging: llama.cpp's log lines go to Python's logging --------------------
_log = logging.getLogger("llama.cpp")
_LEVELS = {GGML_LOG_LEVEL_DEBUG: logging.DEBUG, GGML_LOG_LEVEL_INFO: logging.DEBUG,
           GGML_LOG_LEVEL_WARN: logging.WARNING, GGML_LOG_LEVEL_ERROR: logging.ERROR}
_last_level = [logging.DEBUG]
_errors: collections.deque[str] = collections.deque(maxlen=4)


def take_errors() -> list[str]:
    """llama.cpp's error lines since the last call (the latest few): why a call returned NULL."""
    lines = list(_errors)
    _errors.clear()
    return lines


@log_callback
def _on_log(level: int, text: bytes, _user: int) -> None:
    if level != GGML_LOG_LEVEL_CONT:
        _last_level[0] = _LEVELS.get(level, logging.DEBUG)
        if level == GGML_LOG_LEVEL_ERROR:
            _errors.append(text.decode("utf-8", "replace").strip())
    if _log.isEnabledFor(_last_level[0]):
        line = text.decode("utf-8", "replace").rstrip("\n")
        if line:
            _log.log(_last_level[0], "%s", line)


lib.llama_log_set(_on_log, None)
lib.llama_backend_init()
