"""What the doors share besides the models: request limits and shaping choices, the HTTP door's own
settings, the LoRA adapters requests may name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.async_engine import AsyncEngine
from server.adapters import AdapterDir
from server.conversations import ResponseStore
from server.sampling_defaults import SamplingDefaults
from server.shaping import Shaper

STUDIO_DIR = Path(__file__).resolve().parent.parent / "studio"


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout: float = 30.0  # seconds a client may take to send its request body
    max_n: int = 16
    truncate: bool = False
    reasoning_format: str = "auto"   # auto: thinking sections go to reasoning_content; none: left in content
    reasoning: str = "auto"          # on | off: templates are told to think or not (--reasoning)
    verbose_answers: bool = False    # every answer carries __verbose (--verbose-answers)
    require_tenant: bool = False
    cors_origins: tuple[str, ...] = ()
    cors_headers: str | None = None    # Access-Control-Allow-Headers; None: what the preflight asks for
    metrics_on_http_port: bool = True  # False when --metrics-port serves them apart
    embeddings_only: bool = False      # no generation: chat and completions answer 400
    studio_dir: Path | None = STUDIO_DIR  # None: no studio (--no-studio)
    adapters: AdapterDir = field(default_factory=lambda: AdapterDir(None))  # the LoRA adapters requests may name
    responses: ResponseStore = field(default_factory=ResponseStore)  # stored Responses (previous_response_id)
    metrics: bool = True               # False: /metrics answers 501 (--no-metrics)
    slots: bool = True                 # False: /slots answers 501 (--no-slots)
    props: bool = False                # POST /props may change settings (--props)
    slot_save_path: Path | None = None  # where /slots/{id}?action=save|restore keeps KV states
    reranking: bool = False            # /rerank served by rank pooling (--reranking)

    def shaper(self, engine: AsyncEngine, defaults: SamplingDefaults, *, rag_template: str,
               system_prompt: str | None) -> Shaper:
        """A Shaper for one profile's engine, sampling defaults and prompts."""
        return Shaper(engine, defaults=defaults, max_n=self.max_n, truncate=self.truncate, rag_template=rag_template,
                      system_prompt=system_prompt, reasoning_format=self.reasoning_format, adapters=self.adapters,
                      thinking=self.reasoning, verbose=self.verbose_answers)
