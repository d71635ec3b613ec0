"""What a request gets for each sampling field it leaves out, on every door."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SamplingDefaults:
    """The built-in values are the ones loadtest/score_defaults.py scores best on the default model
    (tests/test_sampling_defaults.py holds them to at least llama-server's own defaults); a flag or the
    model's GGUF recommendation replaces any of them."""

    temperature: float = 0.2
    top_k: int = 40          # llama.cpp's and Ollama's: the whole 49k vocabulary costs ~10x more per token on CPU
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int | None = 1024  # a looping model must not run to the end of a 16k context
    seed: int | None = None        # None: each request that sets no seed gets a random one

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def choose(cls, flags: dict, recommended: dict) -> tuple[SamplingDefaults, dict[str, str]]:
        """Per field: the server's flag when given, else the model's recommendation (its GGUF),
        else the built-in value; and where each one came from."""
        values, sources = {}, {}
        for f in fields(cls):
            for source, given in (("flag", flags), ("model", recommended)):
                if given.get(f.name) is not None:
                    values[f.name], sources[f.name] = given[f.name], source
                    break
            else:
                sources[f.name] = "built-in"
        return cls(**values), sources
