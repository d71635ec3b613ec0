"""The engine as asyncio sees it: `async for out in engine.generate(request)`.

The parent process keeps the tokenizer (a vocab-only model), the chat
template and the scheduler. The step loop runs on the event loop itself, driven
by the workers' answers: a worker's one-byte "done" wakes the loop (a reader
on its pipe), the loop reads the step's tokens, turns them into text, puts
them on the requests' queues, plans the next step, writes it to the worker's
shared memory and rings. One thread and one wake-up per step: on 2 cores every
extra thread hand-off (a GIL transfer, a self-pipe wake) is taken from
llama.cpp's spinning threads. Planning never waits: nothing here blocks.

Overlap scheduling: each worker has two step buffers, and two steps are kept
in flight, so step N+1 is planned, written and rung while the worker decodes
step N, and the worker starts N+1 the moment N is done instead of waiting for
the parent to finish N and plan N+1 (see engine/scheduler.py for how rows
refer to tokens still being sampled).

Decode bursts: on 2 cores every wake-up of this process takes a core from
llama.cpp's threads, so while every sequence only decodes, a step is a burst of
decodes that lasts up to config.burst_ms (measured from the last decode-only
steps); a request that arrives or is cancelled cuts the newest burst short.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import numpy as np
import orjson

from engine import logs, slots
from engine.chat_template import ChatTemplate
from engine.config import EngineConfig
from engine.cpu_turns import CpuTurns
from engine.fair_queue import TenantLimits
from engine.guidance import check_grammar
from engine.kv_store import KvStore
from engine.llama import Model
from engine.output_processor import OutputProcessor, Stream, final_output
from engine.preemption import Parking
from engine.request import EngineError, Output, Request
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.slots import Slots
from engine.speculative import Speculator
from engine.step import OpKind, StepPlan
from engine.transport import StepBuffer
from engine.worker_handle import WorkerHandle, start_workers
from engine.worker_state import WorkerState

log = logging.getLogger("sentiric.engine")
batch_log = logging.getLogger("sentiric.batch")
_TICK_S = 0.1  # how often respawning workers and the step watchdog are looked at


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, generation: bool = True, turns: CpuTurns | None = None):
        self.config = config
        self.generation = generation  # False (--embeddings-only): the tokenizer only, no worker processes
        self.cpu_turns = turns  # decodes on the same cores take turns (engine/cpu_turns.py); None: not shared
        self.vocab_model: Model | None = None
        self.template: ChatTemplate | None = None
        self._workers: list[WorkerHandle] = []
        self._scheduler: Scheduler | None = None
        self._streams: dict[Sequence, Stream] = {}
        self._outputs: OutputProcessor | None = None
        self.eog_tokens: frozenset[int] = frozenset()  # the end-of-generation tokens
        self.slots: Slots | None = None                # llama-server's slots, once started
        self._loop: asyncio.AbstractEventLoop | None = None
        # steps in flight, oldest first: per step, (plan, buffer, the worker's epoch, the step's number)
        self._in_flight: collections.deque[list[tuple[StepPlan, StepBuffer, int, int]]] = collections.deque()
        self._pump_soon = False  # a _pump is already scheduled
        self._tick: asyncio.TimerHandle | None = None
        self._stopping = False
        self.ready = False
        self._worker_restarts = 0
        self._batch_sizes = collections.Counter()
        self._last_batch = 0
        self._parent_us = collections.deque(maxlen=256)
        self._parent_s = 0.0  # the step loop's time on the current step (planning, writing, completing)
        self.store: KvStore | None = None  # prefixes evicted from the KV buffer, in RAM and on disk
        self.parking: Parking | None = None  # the KV of sequences preempted for another tenant
        self.kv_bytes_per_cell = 0

    # --- lifecycle ---
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._start_blocking)
        for w in self._workers:
            self._watch(w)
        self._tick = self._loop.call_later(_TICK_S, self._on_tick)
        if self.cpu_turns is not None:
            self.cpu_turns.join(self, lambda: bool(self._streams),
                             lambda: self._loop.call_soon_threadsafe(self._pump_later))
        self.ready = True

    def _start_blocking(self) -> None:
        cfg = self.config
        self.vocab_model = Model(cfg.model_path, vocab_only=True)
        vocab = self.vocab_model.vocab
        # the per-token lookups of the step loop, as plain Python data (a ctypes call each costs more)
        pieces = [vocab.token_to_piece(t) for t in range(vocab.n_tokens)]
        eog = frozenset(t for t in range(vocab.n_tokens) if vocab.is_eog(t))
        self.template = ChatTemplate(cfg.chat_template or self.vocab_model.chat_template(),
                                     bos_token=vocab.token_to_piece(vocab.bos, special=True).decode("utf-8", "replace") if vocab.bos >= 0 else "",
                                     eos_token=vocab.token_to_piece(vocab.eos, special=True).decode("utf-8", "replace") if vocab.eos >= 0 else "")
        self.n_ctx_train = self.vocab_model.n_ctx_train
        self.kv_bytes_per_cell = self.vocab_model.kv_bytes_per_cell(cfg.cache_type_k, cfg.cache_type_v)
        cfg.resolve_ctx_size(self.n_ctx_train, self.kv_bytes_per_cell)
        self.store = KvStore.for_config(cfg) if cfg.store_on and self.generation else None
        if orphans := StepBuffer.remove_orphans():
            log.info("removed %d step buffers left in /dev/shm by services that were killed", len(orphans))
        self._workers, states = start_workers(cfg, cfg.workers if self.generation else 0, self.store)
        self.parking = Parking.for_config(cfg, self.kv_bytes_per_cell, len(states))
        self._scheduler = Scheduler(states, max_waiting=cfg.max_waiting, step_tokens=cfg.batch_size,
                                    reserve_cap=max(256, cfg.ctx_size // cfg.parallel), is_eog=eog.__contains__,
                                    kv_unified=cfg.kv_unified, prompt_halves=cfg.prompt_halves, store=self.store,
                                    fair=cfg.tenant_fairness, speculator=Speculator(cfg.spec_type, cfg.spec_draft_max, bool(cfg.model_draft)),
                                    parking=self.parking)
        self._scheduler.waiting.set_limits(cfg.tenant_limits, cfg.tenant_overrides)
        self._outputs = OutputProcessor(self._scheduler, pieces, eog, self._streams)
        self.eog_tokens = eog
        self.slots = Slots(self._scheduler, cfg, self._pump_later)  # llama-server's /slots

    async def shutdown(self) -> None:
        if self.store is not None and self._scheduler is not None and not self._stopping:
            await self._save_cache()
        self._stopping = True
        if self.cpu_turns is not None:
            self.cpu_turns.leave(self)
        if self._tick is not None:
            self._tick.cancel()
        for w in self._workers:
            self._unwatch(w)
        self._stop_workers()
        for stream in self._streams.values():
            stream.queue.put_nowait(Output(finish_reason="error", error="the server is shutting down"))
        self._streams.clear()
        if self.vocab_model is not None:
            self.vocab_model.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        if self.parking is not None:
            self.parking.close()
        self.ready = False

    async def _save_cache(self, timeout_s: float = 10.0) -> None:
        """Before the workers stop, the prefix cache's entries go to the KV store (SAVE ops in one more step)."""
        for w in self._scheduler.workers:
            if w.alive:
                w.save_cache()
        self._pump_later()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (self._in_flight or any(
                w.pending_ops for w in self._scheduler.workers if w.alive)):
            await asyncio.sleep(0.01)

    def _stop_workers(self) -> None:
        for w in self._workers:
            w.close()

    # --- text helpers (parent side) ---
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.vocab_model.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        """The text of token ids; `special`: control tokens (<|im_end|>...) written out too."""
        for t in tokens:
            self.vocab_model.vocab.check_token(t)
        return self.vocab_model.vocab.detokenize(tokens, unparse_special=special)

    def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None, variables: dict | None = None,
                    add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    variables=variables)

    def validate_sampling(self, params: SamplingParams) -> None:
        """Raise ValueError for settings a worker would reject (bad grammar, bad token ids)."""
        for token in (params.logit_bias or {}):
            self.vocab_model.vocab.check_token(int(token))
        problem = params.grammar and check_grammar(params.grammar)[0]
        if problem:
            raise ValueError(f"the grammar cannot be used: {problem}")

    @property
    def n_ctx(self) -> int:
        """The longest sequence (prompt + completion) a request can have (a sequence's share of
        the context when the KV cache is not unified)."""
        if self._scheduler is None:
            return self.config.ctx_size
        return min((w.n_ctx_seq for w in self._scheduler.workers), default=self.config.ctx_size)

    # --- requests ---
    def submit(self, request: Request) -> Stream:
        """Admit a request now (raises Overloaded, ValueError, EngineError); read it with `next_output`."""
        if not self.ready or self._stopping:
            raise EngineError("the engine is not running")
        if not self.generation:
            raise EngineError("this service runs with --embeddings-only: it has no generation workers")
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if len(request.prompt) >= self.n_ctx:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens but the context holds {self.n_ctx}")
        stream = Stream(request, asyncio.Queue())
        stream.seq = self._scheduler.add(request)  # raises Overloaded, ValueError
        self._streams[stream.seq] = stream
        self._cut_bursts()
        self._pump_later()
        return stream

    async def next_output(self, stream: Stream) -> Output:
        out = await stream.queue.get()
        stream.finished = out.finish_reason is not None
        return out

    def cancel(self, stream: Stream) -> None:
        """Stop a request that has not finished; its KV cells are freed at the next step. Idempotent."""
        if stream.finished:
            return
        stream.finished = True
        seq = stream.seq
        if seq.finish_reason is None:
            self._scheduler.finish(seq, "cancelled", keep_prefix=False)
        self._streams.pop(seq, None)
        if not self._stopping:
            self._cut_bursts()
            self._pump_later()  # its cells are freed by the next step, even when nothing else runs

    async def generate(self, request: Request):
        """Yields Outputs; the last has finish_reason. Leaving early cancels the request."""
        stream = self.submit(request)
        try:
            while not stream.finished:
                yield await self.next_output(stream)
        finally:
            self.cancel(stream)

    # --- the step loop (on the event loop, driven by the workers' answers) ---
    def _pump_later(self) -> None:
        """Plan at the end of this loop iteration: requests submitted together start in one step."""
        if not self._pump_soon:
            self._pump_soon = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Plan, write and ring steps until two are in flight (one without overlap), nothing is left, or
        another model or an embedding decode has the cores' turn."""
        self._pump_soon = False
        depth = 2 if self.config.overlap else 1
        try:
            while not self._stopping and len(self._in_flight) < depth:
                if self.cpu_turns is not None and not self.cpu_turns.may_step(self):
                    self._cut_bursts()  # another's turn: hand over within one decode
                    break
                plans = self._plan()
                if not plans:
                    break
                t0 = time.perf_counter()
                sent = []
                for plan in plans:
                    w = self._workers[plan.worker.index]
                    buf, number = w.send(plan)
                    self._count_batch(plan.batch_size)
                    sent.append((plan, buf, w.epoch, number))
                self._in_flight.append(sent)
                self._parent_s += time.perf_counter() - t0
        except Exception:
            self._engine_failed()
        if self.cpu_turns is not None and not self._in_flight:
            self.cpu_turns.idle(self)

    def _plan(self) -> list[StepPlan]:
        """The next steps; [] when there is nothing to plan."""
        while True:
            plans = self._scheduler.plan(self._max_burst())
            self._follow_preempted()
            ended = [(self._streams.get(s), final_output(s)) for s in self._scheduler.ended]
            if ended:
                self._scheduler.ended.clear()
                self._deliver(ended)
            # the LoRA set whose turn it was had only sequences that just ended: another set's turn
            if plans or self._in_flight or not ended:
                return plans

    def _follow_preempted(self) -> None:
        """A sequence paused for another tenant goes on as its resumed copy: its stream reads that one
        (it sees a gap, nothing else); one cancelled meanwhile is dropped from the queue."""
        for paused, resumed in self._scheduler.preempted:
            stream = self._streams.pop(paused, None)
            if stream is None:
                self._scheduler.finish(resumed, "cancelled", keep_prefix=False)
                continue
            stream.seq = resumed
            self._streams[resumed] = stream
        self._scheduler.preempted.clear()

    def _max_burst(self) -> int:
        """Decodes a burst may run: as many as take config.burst_ms, by the decode time measured last."""
        decode_s = self._outputs.decode_s
        if not self.config.burst_ms or decode_s is None:
            return 1
        return max(1, int(self.config.burst_ms / 1000 / max(decode_s, 1e-4)))

    def _cut_bursts(self) -> None:
        """A request arrived or left: end each worker's newest step early if it is a burst (the change
        is planned for within one decode), or skip it if it only decodes, queued behind another (run
        unless begun: a newcomer's prefill waits for one step in flight, not two). (An older step in
        flight cannot be cut: the newer one was planned to go on where it ends.)"""
        newest, steps = {}, collections.Counter()
        for sent in self._in_flight:
            for entry in sent:
                newest[entry[0].worker.index] = entry
                steps[entry[0].worker.index] += 1
        for plan, buf, epoch, _ in newest.values():
            queued = steps[plan.worker.index] > 1 and plan.rows and all(r.count == 1 and r.output for r in plan.rows)
            if (plan.burst > 1 or queued) and not plan.cut and self._workers[plan.worker.index].epoch == epoch:
                buf.cut[0] = 1
                self._scheduler.cut(plan)

    def _on_answers(self, w: WorkerHandle) -> None:
        """A worker's answer pipe is readable: finish the steps that are complete, plan the next."""
        try:
            epoch = w.epoch
            w.read_answers()
            if w.gone:
                self._unwatch(w)
            while self._in_flight:
                states = [self._workers[plan.worker.index].step_state(sent_epoch, number)
                          for plan, _, sent_epoch, number in self._in_flight[0]]
                if "pending" in states:
                    break
                self._finish_step(self._in_flight.popleft(), states)
            if w.gone and w.epoch == epoch and not any(plan.worker.index == w.index and sent_epoch == epoch
                                                       for sent in self._in_flight for plan, _, sent_epoch, _ in sent):
                deliveries = []  # it died between steps: no step in flight reports it
                self._worker_died(self._scheduler.workers[w.index], deliveries)
                self._deliver(deliveries)
        except Exception:
            self._engine_failed()
            return
        self._pump()

    def _watch(self, w: WorkerHandle) -> None:
        if not w.watched:
            self._loop.add_reader(w.answer_fd, self._on_answers, w)
            w.watched = True

    def _unwatch(self, w: WorkerHandle) -> None:
        """Stop reading a worker's answers (before its pipe is closed: the fd number may be reused)."""
        if w.watched:
            self._loop.remove_reader(w.answer_fd)
            w.watched = False

    def _finish_step(self, sent: list, states: list[str]) -> None:
        """Take the results of a step every worker it went to has answered (or died during)."""
        t1 = time.perf_counter()
        deliveries = []
        for (plan, buf, _, _), state in zip(sent, states):
            slots.settle(plan, buf if state == "done" else None)
            if self.parking is not None and plan.ops:  # a failed unpark computed its tokens
                self._outputs.prompt_tokens_computed += self.parking.step_done(
                    plan.ops, buf.op_status if state == "done" else None)
            if state == "done":
                if plan.ops and any(op.kind == OpKind.ADAPTERS for op in plan.ops):
                    self._workers[plan.worker.index].adapters_loaded = buf.adapters_loaded_json()
                if self.store is not None and plan.ops:  # a restore that failed computed its tokens
                    self._outputs.prompt_tokens_computed += self.store.step_done(plan.ops, buf.op_status, buf.op_us)
                self._outputs.process(plan, buf, deliveries)
            elif state == "died":
                self._worker_died(plan.worker, deliveries)
        self._deliver(deliveries)
        self._parent_s += time.perf_counter() - t1
        self._parent_us.append(self._parent_s * 1e6)
        self._parent_s = 0.0

    def _on_tick(self) -> None:
        """Now and then: the step watchdog, respawned workers that have loaded their model, and a turn on
        the cores waited for (its holder may hang: past the stall limit this engine goes on alongside)."""
        try:
            for w in self._workers:
                w.check_hung()
            self._poll_respawns()
            if self.cpu_turns is not None and self._streams and not self._in_flight:
                self._pump_later()
        except Exception:
            self._engine_failed()
        if not self._stopping:
            self._tick = self._loop.call_later(_TICK_S, self._on_tick)

    def _engine_failed(self) -> None:
        log.exception("the engine loop failed; failing all requests", extra=logs.event("ENGINE_FAILED"))
        self._stopping = True
        self._deliver([(s, Output(finish_reason="error", error="internal engine error"))
                       for s in list(self._streams.values())])

    def _count_batch(self, size: int) -> None:
        if size:
            self._last_batch = size
            self._batch_sizes[size] += 1
            level = logging.INFO if self.config.log_batches else logging.DEBUG
            if batch_log.isEnabledFor(level):
                batch_log.log(level, "Processing batch of size: %d", size, extra=logs.event("DECODE_STEP", batch_size=size))

    def _worker_died(self, state: WorkerState, deliveries: list) -> None:
        w = self._workers[state.index]
        self._unwatch(w)
        w.kill_for_respawn()
        log.error("worker %d died (exit code %s); respawning it", w.index, w.process.exitcode,
                  extra=logs.event("WORKER_DIED", worker=w.index, exit_code=w.process.exitcode))
        what = (f"stopped answering (no decode step in {w.config.step_timeout:g} s) and was replaced" if w.hung
                else f"crashed (exit code {w.process.exitcode}); the service recovered")
        for seq in self._scheduler.worker_lost(state):
            stream = self._streams.pop(seq, None)
            if stream is None:
                continue
            # nothing was sent yet: run it again, once (a request that kills its worker, e.g. with a LoRA
            # adapter llama.cpp loads but cannot compute with, must not take every new worker down too)
            if seq.n_generated == 0 and not stream.rerun:
                stream.rerun = True
                stream.seq = self._scheduler.add(stream.request, front=True)
                self._streams[stream.seq] = stream
            else:
                deliveries.append((stream, final_output(
                    seq, error=f"the worker process running this request {what}, please retry")))
        w.restarts += 1
        self._worker_restarts += 1
        w.spawn()

    def _poll_respawns(self) -> None:
        for state in self._scheduler.workers:
            if state.alive:
                continue
            w = self._workers[state.index]
            try:
                if w.poll_ready() is not None:
                    state.alive = True
                    self._watch(w)
                    log.info("worker %d is back", w.index, extra=logs.event("WORKER_RESTARTED", worker=w.index))
                    self._pump_later()
            except EngineError as exc:
                log.error("%s; trying again", exc, extra=logs.event("WORKER_START_FAILED", worker=w.index))
                w.kill_for_respawn()
                w.spawn()

    def _deliver(self, deliveries: list) -> None:
        for s, out in deliveries:
            if s is not None:
                if out.finish_reason is not None:
                    self._streams.pop(s.seq, None)
                s.queue.put_nowait(out)

    # --- numbers ---
    def stats(self) -> dict:
        """Call on the event loop (the step loop changes these numbers there)."""
        # before the start, a scheduler without workers gives its numbers' zeros
        sched = self._scheduler or Scheduler([], max_waiting=0, step_tokens=1, reserve_cap=1)
        outputs = self._outputs
        return {
            **sched.stats(),
            "workers": len(self._workers),
            "worker_restarts": self._worker_restarts,
            "steps": outputs.steps if outputs else 0,
            "generated_tokens": outputs.generated_tokens if outputs else 0,
            "prompt_tokens_computed": outputs.prompt_tokens_computed if outputs else 0,
            "last_batch_size": self._last_batch if sched.running else 0,
            "batch_size_counts": dict(self._batch_sizes),
            "tokens_per_second": round(outputs.tokens_per_second(), 1) if outputs else 0.0,
            "parent_us_per_step": round(float(np.median(self._parent_us)), 1) if self._parent_us else 0.0,
            "adapters_loaded": self.adapters_loaded(),
            "kv_cache_type": {"k": self.config.cache_type_k, "v": self.config.cache_type_v},
            "kv_bytes_per_cell": self.kv_bytes_per_cell,
            "kv_bytes": self.kv_bytes_per_cell * sum(w.n_ctx for w in sched.workers),
            "parking": self.parking.stats() if self.parking is not None else None,
            "kv_store": None if self.store is None or outputs is None else
            self.store.stats(prefill_s_per_token=outputs.prefill_s / max(1, outputs.prompt_tokens_computed)),
        }

    def set_tenant_limits(self, default: TenantLimits, overrides: dict[str, TenantLimits]) -> None:
        """New quotas and priorities (the tenants file was reloaded): they apply from the next admission."""
        self.config.tenant_limits, self.config.tenant_overrides = default, overrides
        if self._scheduler is not None:
            self._scheduler.waiting.set_limits(default, overrides)

    def adapters_loaded(self) -> list[list[str]]:
        """Per worker, the LoRA adapters its process holds, least recently used first."""
        return [orjson.loads(w.adapters_loaded) for w in self._workers]

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]

