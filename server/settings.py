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
    require_tenant: bool = False
    cors_origins: tuple[str, ...] = ()
    metrics_on_http_port: bool = True  # False when --metrics-port serves them apart
    embeddings_only: bool = False      # no generation: chat and completions answer 400
    studio_dir: Path = STUDIO_DIR
    adapters: AdapterDir = field(default_factory=lambda: AdapterDir(None))  # the LoRA adapters requests may name
    responses: ResponseStore = field(default_factory=ResponseStore)  # stored Responses (previous_response_id)

    def shaper(self, engine: AsyncEngine, defaults: SamplingDefaults, *, rag_template: str,
               system_prompt: str | None) -> Shaper:
        """A Shaper for one profile's engine, sampling defaults and prompts."""
        return Shaper(engine, defaults=defaults, max_n=self.max_n, truncate=self.truncate, rag_template=rag_template,
                      system_prompt=system_prompt, reasoning_format=self.reasoning_format, adapters=self.adapters)
