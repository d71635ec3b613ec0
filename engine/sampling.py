"""How a sequence picks its tokens, as plain data (no libllama: the scheduler and requests use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    """Per-sequence sampling settings (OpenAI names where they exist)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    grammar: str | None = None  # an llguidance grammar (engine/guidance.py): it masks the logits first

    @property
    def greedy(self) -> bool:
        """Plain argmax (of the grammar's mask, if any): no temperature, penalty or bias to apply."""
        return (self.temperature <= 0 and self.repeat_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias)

    @property
    def resumable(self) -> bool:
        """A preempted sequence resumes with a new chain and answers the same: no grammar (its parse) nor
        seed (the generator's place); penalties see the last tokens again (SamplerSpec.history)."""
        return not self.grammar and self.seed is None
