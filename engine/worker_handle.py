"""The parent's side of a worker process: spawning it, its step buffers, the doorbell both ways,
the step watchdog, stopping it."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time

from engine import logs, worker
from engine.config import EngineConfig
from engine.request import EngineError
from engine.step import StepPlan
from engine.transport import StepBuffer
from engine.worker_state import WorkerState

log = logging.getLogger("sentiric.engine")
_STARTUP_TIMEOUT_S = 300


class WorkerHandle:
    """The parent's handle on one worker process and its two step buffers (steps alternate
    between them, so one can be written while the worker runs the other)."""

    def __init__(self, index: int, config: EngineConfig):
        self.index, self.config = index, config
        self.buffers = (StepBuffer.create(config.batch_size), StepBuffer.create(config.batch_size))
        self.process = None
        self.restarts = 0
        self.step_id = 0
        self.rung = 0      # steps rung since this process was spawned: picks the next buffer
        self.answered = 0  # steps it has answered since it was spawned
        self.gone = False  # its end of the answer pipe closed: it died
        self.watched = False  # the event loop reads its answer pipe
        self.progress_at = 0.0  # when it last answered a step, or was rung while idle (the watchdog's clock)
        self.epoch = 0     # incremented at every spawn: steps sent to a dead process are dropped
        self.hung = False  # killed by the step watchdog (not crashed)
        self.adapters_loaded = b"[]"  # JSON: the LoRA adapters the process holds, as it last reported them

    def spawn(self) -> None:
        ctx = mp.get_context("spawn")
        self.to_worker_r, self.to_worker = ctx.Pipe(duplex=False)
        self.from_worker, self.from_worker_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=worker.run, name=f"sentiric-worker-{self.index}", daemon=True,
            args=(self.index, self.config.worker_config(), tuple(b.spec() for b in self.buffers),
                  self.to_worker_r, self.from_worker_w, logs.current_settings()))
        self.process.start()
        self.to_worker_r.close()
        self.from_worker_w.close()  # so the worker's death reads as EOF
        self.started_at = time.monotonic()
        self.rung = self.answered = 0
        self.gone = False
        self.epoch += 1
        self.hung = False
        self.adapters_loaded = b"[]"
        self.answer_fd = self.from_worker.fileno()

    @property
    def next_buffer(self) -> StepBuffer:
        """The buffer the worker reads its next step from."""
        return self.buffers[self.rung & 1]

    def send(self, plan: StepPlan) -> tuple[StepBuffer, int]:
        """Write a planned step into the next buffer and ring; returns the buffer and the step's number
        (answered once `answered` reaches it)."""
        buf = self.buffers[self.rung & 1]
        self.step_id += 1
        buf.write(plan, self.step_id)
        return buf, self.ring()

    def poll_ready(self) -> dict | None:
        """The worker's hello once it has loaded the model; raises if it failed or died."""
        if self.from_worker.poll():
            try:
                msg = self.from_worker.recv()
            except EOFError:
                raise EngineError(f"worker {self.index} exited while loading (exit code {self.process.exitcode})")
            if "error" in msg:
                raise EngineError(f"worker {self.index} failed to start: {msg['error']}")
            return msg
        if not self.process.is_alive():
            raise EngineError(f"worker {self.index} exited while loading (exit code {self.process.exitcode})")
        if time.monotonic() - self.started_at > _STARTUP_TIMEOUT_S:
            raise EngineError(f"worker {self.index} did not load the model in {_STARTUP_TIMEOUT_S} s")
        return None

    def ring(self) -> int:
        """Send the step written to next_buffer; returns its number (answered once `answered` reaches it)."""
        if self.rung == self.answered:
            self.progress_at = time.monotonic()
        self.rung += 1
        try:
            os.write(self.to_worker.fileno(), b"s")
        except OSError:  # the worker is dead: its answer pipe reads as end of file
            pass
        return self.rung

    def read_answers(self) -> None:
        """Count the answers waiting on the pipe (called when it is readable, so this does not block).
        Only the worker holds the pipe's other end, so a dead worker reads as end of file: `gone`."""
        try:
            answers = os.read(self.answer_fd, 256)
        except OSError:
            answers = b""
        if answers:
            self.answered += len(answers)
            self.progress_at = time.monotonic()
        else:
            self.gone = True

    def step_state(self, epoch: int, number: int) -> str:
        """What became of step `number`, sent in `epoch`: done, pending, died, or dropped (sent to a
        process that has been replaced since)."""
        if self.epoch != epoch:
            return "dropped"
        if self.answered >= number:
            return "done"
        return "died" if self.gone else "pending"

    def check_hung(self) -> None:
        """Kill a worker that has owed an answer for longer than the step timeout (a decode that never
        returns, a stopped process); its pipe then reads as end of file like any death."""
        timeout = self.config.step_timeout
        if (timeout and self.rung > self.answered and not self.gone and not self.hung
                and time.monotonic() - self.progress_at > timeout):
            self.hung = True
            log.error("worker %d answered no step in %g s; killing it", self.index, timeout,
                      extra=logs.event("WORKER_HUNG", worker=self.index, step_timeout_s=timeout))
            self.process.kill()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            self.next_buffer.header[0] = -1
            self.ring()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        for conn in (self.to_worker, self.from_worker):
            conn.close()

    def close(self) -> None:
        """Stop the process and remove its step buffers."""
        self.stop()
        for buf in self.buffers:
            buf.unlink()

    def kill_for_respawn(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        for conn in (self.to_worker, self.from_worker):
            conn.close()


def start_workers(cfg: EngineConfig, count: int, store) -> tuple[list[WorkerHandle], list[WorkerState]]:
    """Spawn `count` workers and wait until each has loaded the model: their handles and the scheduler's
    view of each (its KV cells and sequences as the worker reports them). All are stopped if one fails."""
    handles, states = [], []
    try:
        for i in range(count):
            handles.append(WorkerHandle(i, cfg))
            handles[-1].spawn()
        for w in handles:
            while (hello := w.poll_ready()) is None:
                time.sleep(0.02)
            state = WorkerState(w.index, hello["n_ctx"], cfg.parallel, cfg.cache_slots, hello["n_ctx_seq"],
                                cfg.cache_cells, hello["n_seq_max"], store=store)
            state.alive = True
            states.append(state)
            log.info("worker %d ready (pid %d, %d KV cells, %d sequences)", w.index, hello["pid"],
                     hello["n_ctx"], hello["n_seq_max"], extra=logs.event("WORKER_READY", worker=w.index))
    except BaseException:
        for w in handles:
            w.close()
        raise
    return handles, states
