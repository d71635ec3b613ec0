"""CoreTurns: generation steps and embedding decodes taking turns on shared cores (engine/core_turns.py),
driven from threads as the engine's event loop and the embedding threads drive it."""

import threading
import time

from engine.core_turns import CoreTurns


class Engine:
    """The generation side as the engine drives it: requests or not, and how often it was resumed."""

    def __init__(self, turns: CoreTurns, busy: bool = True):
        self.busy, self.resumed = busy, 0
        turns.join(self, lambda: self.busy, self.resume)

    def resume(self):
        self.resumed += 1


def take_in_thread(turns: CoreTurns, give_up=lambda: False):
    """take() in a thread, as an embedding process's caller does: (set once it has the turn, [its answer])."""
    result = []
    done = threading.Event()
    thread = threading.Thread(target=lambda: (result.append(turns.take(give_up)), done.set()), daemon=True)
    thread.start()
    return done, result


def test_an_embedding_decode_waits_for_the_steps_in_flight():
    turns = CoreTurns()
    engine = Engine(turns)
    assert turns.may_step(engine)  # a step is rung
    done, result = take_in_thread(turns)
    time.sleep(0.05)
    assert not done.is_set(), "an embedding decode ran while a generation step was in flight"
    assert not turns.may_step(engine), "generation rang another step while an embedding waited past its slice"
    turns.idle(engine)  # the step in flight answered
    assert done.wait(2) and result == [True]  # generation has requests: the decode is told to be short
    assert not turns.may_step(engine)  # the cores are the embedding's now
    turns.give()
    assert engine.resumed == 1 and turns.may_step(engine)


def test_generation_steps_for_as_long_as_the_embedding_decode_took():
    turns = CoreTurns()
    engine = Engine(turns)
    turns.take()
    time.sleep(0.2)  # the decode
    turns.give()
    done, _ = take_in_thread(turns)  # the next decode of the same batch
    assert turns.may_step(engine)
    turns.idle(engine)
    time.sleep(0.1)
    assert not done.is_set(), "the next embedding decode took generation's slice"
    assert turns.may_step(engine)  # still within the 0.2 s slice
    turns.idle(engine)
    assert done.wait(2)
    turns.give()


def test_alone_each_side_runs_freely():
    turns = CoreTurns()
    idle_engine = Engine(turns, busy=False)
    turns.take()
    turns.give()
    started = time.monotonic()
    assert turns.take() is False  # no requests: no slice to wait for, full-size decodes
    assert time.monotonic() - started < 0.05
    turns.give()
    assert all(turns.may_step(idle_engine) for _ in range(3))  # no embedding waits: generation steps on
    assert turns.embedding_turns == 2 and turns.embedding_turns_while_generating == 0


def test_a_stopping_embedding_process_gives_up_waiting():
    turns = CoreTurns()
    engine = Engine(turns)
    assert turns.may_step(engine)
    stopping = threading.Event()
    done, _ = take_in_thread(turns, give_up=stopping.is_set)
    time.sleep(0.05)
    stopping.set()
    assert done.wait(2)


def test_an_engine_that_leaves_releases_the_cores():
    turns = CoreTurns()
    engine = Engine(turns)
    assert turns.may_step(engine)
    done, _ = take_in_thread(turns)
    turns.leave(engine)  # its shutdown: the steps in flight will never be reported
    assert done.wait(2)
