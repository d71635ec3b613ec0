"""llama.cpp's sampler chain for one sequence, built from SamplingParams, and log-probabilities."""

from __future__ import annotations

import math

import numpy as np

from engine.llama import Context, LlamaError, Vocab, _Owner
from engine.llama_cpp import LLAMA_DEFAULT_SEED, lib, llama_logit_bias
from engine.sampling import SamplingParams


class SamplerChain(_Owner):
    """One llama.cpp sampler chain built from SamplingParams."""

    _free = lib.llama_sampler_free

    def __init__(self, vocab: Vocab, params: SamplingParams):
        super().__init__(lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params()),
                         "llama_sampler_chain_init failed")
        try:
            self._build(vocab, params)
        except BaseException:
            self.close()
            raise

    def _add(self, smpl: int | None, what: str) -> None:
        if not smpl:
            raise LlamaError(what)
        lib.llama_sampler_chain_add(self._ptr, smpl)  # the chain owns it from here

    def _build(self, vocab: Vocab, p: SamplingParams) -> None:
        n_vocab = vocab.n_tokens
        if p.logit_bias:
            items = list(p.logit_bias.items())
            arr = (llama_logit_bias * len(items))(*[llama_logit_bias(t, b) for t, b in items])
            self._add(lib.llama_sampler_init_logit_bias(n_vocab, len(items), arr), "bad logit_bias")
        # top-k before the penalties: llama.cpp's penalty sampler looks every candidate up in a hash map,
        # so over the whole vocabulary it costs ~100x what it does over top-k's few candidates
        if p.top_k > 0:
            self._add(lib.llama_sampler_init_top_k(p.top_k), "top_k")
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            self._add(lib.llama_sampler_init_penalties(n_vocab, p.penalty_last_n, p.repeat_penalty,
                                                       p.frequency_penalty, p.presence_penalty), "bad penalties")
        if p.temperature <= 0:
            self._add(lib.llama_sampler_init_greedy(), "greedy sampler")
            return
        if p.typical_p < 1.0:
            self._add(lib.llama_sampler_init_typical(p.typical_p, 1), "typical_p")
        if p.top_p < 1.0:
            self._add(lib.llama_sampler_init_top_p(p.top_p, 1), "top_p")
        if p.min_p > 0.0:
            self._add(lib.llama_sampler_init_min_p(p.min_p, 1), "min_p")
        self._add(lib.llama_sampler_init_temp(p.temperature), "temperature")
        seed = LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
        self._add(lib.llama_sampler_init_dist(seed), "dist")

    def sample(self, ctx: Context, row: int) -> int:
        """Sample the token for batch row `row` and record it in the chain's history."""
        return lib.llama_sampler_sample(self.ptr, ctx.ptr, row)


    def accept(self, token: int) -> None:
        """Count a token as sampled (a resumed sequence's earlier ones: the penalties see them again)."""
        lib.llama_sampler_accept(self.ptr, token)

    def __len__(self) -> int:
        return lib.llama_sampler_chain_n(self.ptr)


def log_softmax(row: np.ndarray) -> np.ndarray:
    """Log-probabilities of one row of logits (float64 for stable small values)."""
    x = row.astype(np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))
