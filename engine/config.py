"""Engine settings (the server's CLI fills these in)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from engine.fair_queue import TenantLimits

# ctx_size 0 (auto): a split cache gives every sequence SEQ_CTX cells (at most the model's training
# context), a unified one has UNIFIED_CTX; either way the KV cache takes at most KV_MEMORY_SHARE of RAM
SEQ_CTX = 4096
UNIFIED_CTX = 16384
KV_MEMORY_SHARE = 0.25
MIN_SEQ_CTX = 512


@dataclass
class EngineConfig:
    model_path: str
    workers: int = 1                  # worker processes, each with its own model and context
    parallel: int = 16                # sequences decoded together per worker
    ctx_size: int = 0                 # KV cells per worker, shared by its sequences; 0 = auto (resolve_ctx_size)
    batch_size: int = 0               # tokens per step per worker (decodes + prefill chunks); 0 = auto
    ubatch_size: int = 512            # llama.cpp's physical batch
    prompt_batching: str = "all"      # all | halves: the prompts arriving together one step finishes (prompt_halves)
    threads: int = 0                  # per worker; 0 = all cores divided among the workers
    flash_attn: str = "auto"          # auto | on | off
    kv_unified: bool = False          # one KV buffer for all sequences, else one stream per sequence
    cache_slots: int = -1             # finished sequences kept as prefix cache; -1 = parallel
    cache_cells: int = -1             # KV cells the prefix cache may hold alone; -1 = ctx_size // 32 (unified)
    max_waiting: int = 256            # queued requests beyond this get Overloaded (HTTP 429)
    n_gpu_layers: int = -1            # layers offloaded to a GPU build; -1 = all
    kv_offload: bool = True           # with offloaded layers, their KV cache and attention on the GPU too
    gpu: bool | None = None           # layers run on a GPU; None = n_gpu_layers != 0 and libllama can offload
    log_batches: bool = False         # log "Processing batch of size: N" at INFO instead of DEBUG
    overlap: bool = True              # plan step N+1 while the worker decodes step N (two steps in flight)
    burst_ms: float = 50.0            # decode-only steps run as bursts of up to this long; 0 = one decode per step
    chat_template: str | None = None  # a Jinja chat template (or a llama.cpp built-in's name) instead of the model's
    step_timeout: float = 120.0       # a worker that answers no step for this long is killed and replaced; 0 = never
    lora_dir: str | None = None       # GGUF LoRA adapters requests name (file name without .gguf)
    lora_cache: int = 8               # LoRA adapters a worker keeps loaded (least recently used ones go)
    cache_type_k: str = "f16"         # KV cache types (f16, q8_0, q4_0, ...: engine.llama.KV_CACHE_TYPES)
    cache_type_v: str = "f16"         # a quantized V needs flash attention
    kv_ram_mb: int = 0                # KV store: evicted prefixes kept in host RAM (tmpfs), MiB; 0 = no RAM tier
    kv_store: str | None = None       # KV store: a directory for the disk tier (survives restarts, shareable)
    kv_store_mb: int = 10240          # the disk tier's bound, MiB
    tenant_fairness: bool = True      # admit the least-served tenant first, preempt for one under its share
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)  # every tenant's quotas and priority
    tenant_overrides: dict[str, TenantLimits] = field(default_factory=dict)  # per tenant (the tenants file)
    spec_type: str = "auto"           # drafting (engine/speculative.py): auto | ngram | draft | draft-always | none
    model_draft: str | None = None    # a draft model of the same vocabulary (engine/draft_model.py)
    spec_draft_max: int = 16          # drafted tokens per sequence and step, at most

    def __post_init__(self):
        if self.threads <= 0:
            self.threads = max(1, (os.cpu_count() or 1) // max(1, self.workers))
        if self.gpu is None:
            from engine.llama import supports_gpu_offload
            self.gpu = self.n_gpu_layers != 0 and supports_gpu_offload()
        if self.batch_size <= 0:
            self.batch_size = self.auto_batch_size()
        if self.ctx_size:
            self._cache_cells_default()
        if self.cache_slots < 0:
            self.cache_slots = self.parallel
        if self.step_timeout < 0:
            raise ValueError("step_timeout must be 0 (off) or more")
        if self.burst_ms < 0:
            raise ValueError("burst_ms must be 0 (off) or more")
        if self.prompt_batching not in ("all", "halves"):
            raise ValueError("prompt_batching must be all or halves")
        for name in ("workers", "parallel", "batch_size", "ubatch_size", "lora_cache"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.ctx_size < 0:
            raise ValueError("ctx_size must be 0 (auto) or more")
        if self.spec_type not in ("auto", "none", "ngram", "draft", "draft-always"):
            raise ValueError("spec_type must be auto, none, ngram, draft or draft-always")
        self._check_draft_model()
        if self.spec_draft_max < 0:
            raise ValueError("spec_draft_max must be 0 (no drafting) or more")
        if self.flash_attn not in ("auto", "on", "off"):
            raise ValueError("flash_attn must be auto, on or off")
        self._check_kv_types()
        if self.kv_ram_mb < 0 or self.kv_store_mb < 0:
            raise ValueError("--kv-ram-mb and --kv-store-mb must be 0 or more")
        if self.kv_store:
            try:
                os.makedirs(self.kv_store, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"--kv-store {self.kv_store}: cannot create it ({exc.strerror})") from None
            if not os.access(self.kv_store, os.W_OK | os.X_OK):
                raise ValueError(f"--kv-store {self.kv_store}: not writable")

    def _check_kv_types(self) -> None:
        """Refuse at start what llama.cpp would refuse when the worker makes its context."""
        from engine.llama import KV_CACHE_TYPES
        for flag, name in (("--cache-type-k", self.cache_type_k), ("--cache-type-v", self.cache_type_v)):
            if name not in KV_CACHE_TYPES:
                raise ValueError(f"{flag} {name}: not a KV cache type (one of {', '.join(KV_CACHE_TYPES)})")
        if KV_CACHE_TYPES[self.cache_type_v][2] > 1 and self.flash_attn == "off":
            raise ValueError(f"--cache-type-v {self.cache_type_v} (a quantized V cache) needs flash attention: "
                             "use --flash-attn auto or on, or an unquantized --cache-type-v")

    def _check_draft_model(self) -> None:
        """Refuse at start a draft model the workers could not draft with."""
        if self.spec_type.startswith("draft") and not self.model_draft:
            raise ValueError(f"--spec-type {self.spec_type} needs a draft model (--model-draft PATH)")
        if self.model_draft:
            from engine.draft_model import vocab_mismatch
            try:
                why = vocab_mismatch(self.model_path, self.model_draft)
            except (OSError, RuntimeError) as exc:
                raise ValueError(f"--model-draft {self.model_draft}: {exc}") from None
            if why:
                raise ValueError(f"--model-draft {self.model_draft}: {why}; a draft model must have the "
                                 f"vocabulary of the model ({self.model_path})")

    @property
    def store_on(self) -> bool:
        """A KV store below the KV buffer (engine/kv_store.py)."""
        return bool(self.kv_ram_mb or self.kv_store)

    def _cache_cells_default(self) -> None:
        if self.cache_cells < 0:  # in a unified cache every cached cell slows attention; streams do not
            self.cache_cells = self.ctx_size // 32 if self.kv_unified else self.ctx_size

    def resolve_ctx_size(self, n_ctx_train: int, kv_bytes_per_cell: int, memory_bytes: int | None = None) -> None:
        """Size an auto (0) context from the model, once it is known. Split (the default): SEQ_CTX cells
        per sequence, at most the model's training context; unified: UNIFIED_CTX. Then cut to what fits
        KV_MEMORY_SHARE of the memory, the machine's or the container's limit (a 135M model's 16 x 4,096
        cells take 1.4 GiB, an 8B model's 8 GiB), never below MIN_SEQ_CTX per sequence."""
        if not self.ctx_size:
            per_seq = min(SEQ_CTX, n_ctx_train or SEQ_CTX)
            cells = UNIFIED_CTX if self.kv_unified else self.parallel * per_seq
            if memory_bytes is None:
                memory_bytes = _memory_bytes()
            fits = int(memory_bytes * KV_MEMORY_SHARE) // max(1, kv_bytes_per_cell)
            floor = self.parallel * MIN_SEQ_CTX
            self.ctx_size = max(floor, min(cells, fits // (self.parallel * 256) * self.parallel * 256))
        self._cache_cells_default()

    def auto_batch_size(self) -> int:
        """256 on a CPU: a step carrying a prefill chunk stalls every decoding stream, and on a CPU
        256-token chunks prefill about as fast as 512 while halving that stall. A GPU prefills bigger
        chunks at little extra cost (docs: the engine settings' figures)."""
        return 1024 if self.gpu else 256

    @property
    def prompt_halves(self) -> bool:
        """A step finishes only the shorter half of the prompts waiting for their first token. A CPU step's
        time grows with its tokens, so the shortest prompts get their first token sooner while the longest
        wait at most two steps in a row more; it lowers TTFT for bursty, latency-bound traffic at some
        throughput, so it is a choice, not the default."""
        return self.prompt_batching == "halves"

    def worker_config(self) -> dict:
        """What a worker process needs to build its model and context (plain data)."""
        return {
            "model_path": self.model_path,
            "n_gpu_layers": self.n_gpu_layers if self.gpu else 0,
            "lora_dir": self.lora_dir, "lora_cache": self.lora_cache, "model_draft": self.model_draft,
            "context": {
                "n_ctx": self.ctx_size, "n_batch": self.batch_size, "n_ubatch": min(self.ubatch_size, self.batch_size),
                "n_seq_max": self.n_seq_max, "n_threads": self.threads,
                "kv_unified": self.kv_unified, "flash_attn": self.flash_attn, "offload_kqv": self.kv_offload,
                "type_k": self.cache_type_k, "type_v": self.cache_type_v,
            },
        }

    @property
    def n_seq_max(self) -> int:
        """Sequence ids per worker. A unified cache gives the prefix cache ids of its own; split into
        streams (each ctx_size / n_seq_max cells), the cache lives in the streams running sequences
        leave idle, as llama-server's slots keep their last prompt."""
        return self.parallel + self.cache_slots if self.kv_unified else self.parallel

    def as_dict(self) -> dict:
        return asdict(self)


def _memory_bytes() -> int:
    """The machine's memory, or the container's limit when it has a smaller one (cgroup v2)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical
