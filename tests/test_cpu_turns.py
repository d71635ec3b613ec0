"""CpuTurns: the decodes of several models and of embeddings taking turns on shared cores
(engine/cpu_turns.py), driven as the engines' event loop and the embedding threads drive it, on a
clock the test moves (no test waits for time to pass)."""

import threading
import time

import pytest

from engine.cpu_turns import QUANTUM_S, CpuTurns

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**kwargs) -> tuple[CpuTurns, Clock]:
    clock = Clock()
    return CpuTurns(clock=clock, recheck_s=0.002, **kwargs), clock


class Engine:
    """An engine as the turns see it: requests or not, and how often it was resumed."""

    def __init__(self, turns: CpuTurns, busy: bool = True):
        self.busy, self.resumed = busy, 0
        turns.join(self, lambda: self.busy, self.resume)

    def resume(self):
        self.resumed += 1


def take_in_thread(turns: CpuTurns, give_up=lambda: False):
    """take() in a thread, as an embedding process's caller does; returns once it has the turn or is
    queued for it: (set once it has the turn, [the turn])."""
    got, done = [], threading.Event()
    queued = turns.stats()["waiting"]
    threading.Thread(target=lambda: (got.append(turns.take(give_up)), done.set()), daemon=True).start()
    deadline = time.monotonic() + 5
    while not done.is_set() and turns.stats()["waiting"] == queued:
        assert time.monotonic() < deadline, "take() neither returned nor queued"
        time.sleep(0.001)
    return done, got


def test_an_embedding_decode_waits_for_the_steps_in_flight():
    turns, clock = make()
    engine = Engine(turns)
    assert turns.may_step(engine)  # a step is rung
    done, got = take_in_thread(turns)
    assert not done.is_set(), "an embedding decode ran while a generation step was in flight"
    clock.advance(QUANTUM_S - 0.01)
    assert turns.may_step(engine), "generation stopped before its slice was over"
    clock.advance(0.02)
    assert not turns.may_step(engine), "generation rang another step while an embedding waited past its slice"
    turns.idle(engine)  # the steps in flight answered
    assert done.wait(2) and turns.stats()["embedding_decodes_while_generating"] == 1
    assert not turns.may_step(engine)  # the cores are the embedding's now
    turns.give(got[0])
    assert engine.resumed == 1 and turns.may_step(engine)


def test_generation_steps_for_as_long_as_the_embedding_decode_took():
    turns, clock = make()
    engine = Engine(turns)
    turn = turns.take()
    clock.advance(0.3)  # the decode
    turns.give(turn)
    assert turns.may_step(engine)
    done, got = take_in_thread(turns)  # the next decode of the same batch
    clock.advance(0.2)
    assert not done.is_set(), "the next embedding decode took generation's slice"
    assert turns.may_step(engine)  # still within the 0.3 s slice
    clock.advance(0.15)
    assert not turns.may_step(engine)
    turns.idle(engine)
    assert done.wait(2)
    turns.give(got[0])
    assert engine.resumed == 1  # it yielded to the second decode, so its turn came back after it


def test_two_engines_alternate_while_both_have_work():
    turns, clock = make()
    a, b = Engine(turns), Engine(turns)
    assert turns.may_step(a)
    assert not turns.may_step(b) and b.resumed == 0  # queued behind a
    clock.advance(QUANTUM_S)
    assert not turns.may_step(a)  # a's slice is over: it rings no more ...
    turns.idle(a)  # ... and hands over once its steps answered
    assert b.resumed == 1 and turns.may_step(b) and not turns.may_step(a)
    clock.advance(QUANTUM_S)
    assert not turns.may_step(b)
    turns.idle(b)
    assert a.resumed == 1 and turns.may_step(a)  # a queued again when it yielded
    b.busy = False  # b's requests ended meanwhile: it is passed over
    clock.advance(QUANTUM_S)
    assert turns.may_step(a)  # nobody waits
    assert turns.stats()["handovers"] == 2


def test_alone_each_side_runs_freely():
    turns, clock = make()
    idle_engine = Engine(turns, busy=False)
    for _ in range(2):
        done, got = take_in_thread(turns)
        assert done.is_set(), "an embedding decode waited though nobody held the cores"
        turns.give(got[0])
    assert all(turns.may_step(idle_engine) for _ in range(3))  # no embedding waits: generation steps on
    turns.idle(idle_engine)
    assert turns.stats()["embedding_decodes"] == 2 and turns.stats()["embedding_decodes_while_generating"] == 0


def test_a_stopping_embedding_process_gives_up_waiting():
    turns, clock = make()
    engine = Engine(turns)
    assert turns.may_step(engine)
    stopping = threading.Event()
    done, got = take_in_thread(turns, give_up=stopping.is_set)
    assert not done.is_set()
    stopping.set()
    assert done.wait(2)
    turns.give(got[0])  # it never had the cores: nothing changes
    assert turns.may_step(engine) and turns.stats()["waiting"] == 0


def test_an_engine_that_leaves_hands_over():
    turns, clock = make()
    engine = Engine(turns)
    assert turns.may_step(engine)
    done, _ = take_in_thread(turns)
    assert not done.is_set()
    turns.leave(engine)  # its shutdown: the steps in flight will never be reported
    assert done.wait(2)


def test_a_holder_that_hangs_stalls_the_others_only_up_to_the_limit():
    """A stopped embedding process holds its turn until its watchdog kills it (--step-timeout): past the
    stall limit the engine decodes alongside it, as without turns, and turns resume when it hands over."""
    turns, clock = make(stall_s=0.2)
    engine = Engine(turns)
    stuck = turns.take()
    assert not turns.may_step(engine)  # queued behind the embedding decode
    clock.advance(0.15)
    assert not turns.may_step(engine), "went on alongside before the stall limit"
    clock.advance(0.1)
    assert turns.may_step(engine) and turns.may_step(engine)  # stalled: it goes on alongside
    turns.idle(engine)  # (not the holder: nothing changes)
    turns.give(stuck)  # the killed process's turn ends: a 0.25 s hold the engine waited for
    assert engine.resumed == 1 and turns.may_step(engine)  # the queued engine holds the cores again
    done, _ = take_in_thread(turns)  # an engine stuck with steps in flight: the embedding goes on too ...
    clock.advance(0.9)
    assert not done.wait(0.05), "an embedding decode went on alongside within 4x the longest hold"
    clock.advance(0.2)  # ... once it has waited 4 x 0.25 s
    assert done.wait(2)


def test_the_stall_limit_grows_with_the_holds_others_waited_for():
    turns, clock = make(stall_s=0.1)
    engine = Engine(turns)
    turn = turns.take()
    assert not turns.may_step(engine)
    clock.advance(0.06)
    turns.give(turn)  # a 60 ms hold that the engine waited for: the limit is now 4 x 60 ms
    turns.idle(engine)
    turn = turns.take()
    assert not turns.may_step(engine)
    clock.advance(0.15)
    assert not turns.may_step(engine), "a hold within 4x the longest seen is not a stall"
    clock.advance(0.1)
    assert turns.may_step(engine)
    turns.give(turn)
