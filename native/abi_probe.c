/* Prints the C layout of every llama.h struct the ctypes layer declares, one
 * line per struct ("name size") and per field ("name.field offset"), so a test
 * can compare them with engine/llama_cpp.py: a layout mismatch must fail a test,
 * not segfault under load. */
#include <stddef.h>
#include <stdio.h>
#include "llama.h"

#define S(T) printf("%s %zu\n", #T, sizeof(struct T))
#define F(T, f) printf("%s.%s %zu\n", #T, #f, offsetof(struct T, f))

int main(void) {
    S(llama_model_params);
    F(llama_model_params, devices); F(llama_model_params, tensor_buft_overrides);
    F(llama_model_params, n_gpu_layers); F(llama_model_params, split_mode);
    F(llama_model_params, load_mode); F(llama_model_params, lazy_mode);
    F(llama_model_params, main_gpu); F(llama_model_params, tensor_split);
    F(llama_model_params, progress_callback); F(llama_model_params, progress_callback_user_data);
    F(llama_model_params, kv_overrides); F(llama_model_params, vocab_only);
    F(llama_model_params, check_tensors); F(llama_model_params, use_extra_bufts);
    F(llama_model_params, no_host); F(llama_model_params, no_alloc); F(llama_model_params, load_mtp);

    S(llama_context_params);
    F(llama_context_params, n_ctx); F(llama_context_params, n_batch);
    F(llama_context_params, n_ubatch); F(llama_context_params, n_seq_max);
    F(llama_context_params, n_rs_seq); F(llama_context_params, n_outputs_max);
    F(llama_context_params, n_outputs_max_per_seq); F(llama_context_params, n_threads);
    F(llama_context_params, n_threads_batch); F(llama_context_params, ctx_type);
    F(llama_context_params, rope_scaling_type); F(llama_context_params, pooling_type);
    F(llama_context_params, attention_type); F(llama_context_params, flash_attn_type);
    F(llama_context_params, rope_freq_base); F(llama_context_params, rope_freq_scale);
    F(llama_context_params, yarn_ext_factor); F(llama_context_params, yarn_attn_factor);
    F(llama_context_params, yarn_beta_fast); F(llama_context_params, yarn_beta_slow);
    F(llama_context_params, yarn_orig_ctx); F(llama_context_params, defrag_thold);
    F(llama_context_params, cb_eval); F(llama_context_params, cb_eval_user_data);
    F(llama_context_params, type_k); F(llama_context_params, type_v);
    F(llama_context_params, abort_callback); F(llama_context_params, abort_callback_data);
    F(llama_context_params, embeddings); F(llama_context_params, offload_kqv);
    F(llama_context_params, no_perf); F(llama_context_params, op_offload);
    F(llama_context_params, swa_full); F(llama_context_params, kv_unified);
    F(llama_context_params, samplers); F(llama_context_params, n_samplers);
    F(llama_context_params, ctx_other);

    S(llama_batch);
    F(llama_batch, n_tokens); F(llama_batch, token); F(llama_batch, embd);
    F(llama_batch, pos); F(llama_batch, n_seq_id); F(llama_batch, seq_id);
    F(llama_batch, logits);

    S(llama_sampler_chain_params);
    F(llama_sampler_chain_params, no_perf);

    S(llama_chat_message);
    F(llama_chat_message, role); F(llama_chat_message, content);

    S(llama_token_data);
    F(llama_token_data, id); F(llama_token_data, logit); F(llama_token_data, p);

    S(llama_token_data_array);
    F(llama_token_data_array, data); F(llama_token_data_array, size);
    F(llama_token_data_array, selected); F(llama_token_data_array, sorted);

    S(llama_logit_bias);
    F(llama_logit_bias, token); F(llama_logit_bias, bias);

    S(llama_perf_context_data);
    F(llama_perf_context_data, t_start_ms); F(llama_perf_context_data, t_load_ms);
    F(llama_perf_context_data, t_p_eval_ms); F(llama_perf_context_data, t_eval_ms);
    F(llama_perf_context_data, n_p_eval); F(llama_perf_context_data, n_eval);
    F(llama_perf_context_data, n_reused);
    return 0;
}
