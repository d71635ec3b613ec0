"""Output processing (engine/output_processor.py) fed completed steps as a worker writes them into the
step buffer: text from token pieces, end of generation, max_tokens, stop strings inside a burst,
logprobs, failed steps."""

import pytest

from engine.output_processor import OutputProcessor, Stream
from engine.request import Request, TokenLogprob
from engine.scheduler import Scheduler
from engine.step import OpKind
from engine.transport import STATUS_DECODE_FAILED, STATUS_OK, StepBuffer
from engine.worker_state import WorkerState

pytestmark = pytest.mark.unit

EOG = 0
PIECES = [b"<eos>"] + [bytes([t]) for t in range(1, 128)] + [b"\xc3", b"\xa9"]  # 128, 129: the halves of "é"


def tokens(text: str) -> list[int]:
    return [ord(c) for c in text]


class Harness:
    """A scheduler, the output processor and one step buffer; `step()` plays the worker."""

    def __init__(self):
        state = WorkerState(0, 4096, 4, 4)
        state.alive = True
        self.sched = Scheduler([state], max_waiting=8, step_tokens=64, reserve_cap=256, is_eog=lambda t: t == EOG)
        self.streams = {}
        self.outputs = OutputProcessor(self.sched, PIECES, frozenset({EOG}), self.streams)
        self.buf = StepBuffer.create(64)

    def submit(self, prompt=(1, 2, 3), **kwargs) -> Stream:
        stream = Stream(Request(prompt=list(prompt), **kwargs), queue=None)
        stream.seq = self.sched.add(stream.request)
        self.streams[stream.seq] = stream
        return stream

    def step(self, answers: dict, *, max_burst: int = 1, logprobs: dict | None = None, status: int = STATUS_OK,
             failed_starts: tuple = ()) -> dict:
        """Plan a step, answer it as a worker would (`answers[stream]`: the tokens each output row
        sampled, cut to the burst; `logprobs[stream]`: per token (logprob, [(id, logprob), ...]);
        `failed_starts`: streams whose START op failed), and process it: {stream: Output}."""
        [plan] = self.sched.plan(max_burst)
        self.plan, buf, burst = plan, self.buf, plan.burst
        buf.write(plan, 1)
        j = 0
        for row in (r for r in plan.rows if r.output):
            stream = self.streams[row.seq]
            got = answers[stream][:burst]
            buf.out_count[j] = len(got)
            for s, token in enumerate(got):
                buf.out_token[j * burst + s] = token
                lp, top = (logprobs or {}).get(stream, [(0.0, [])] * len(got))[s]
                buf.out_logprob[j * burst + s] = lp
                for k, (t, v) in enumerate(top):
                    buf.out_top_id[j * burst + s, k], buf.out_top_logprob[j * burst + s, k] = t, v
            j += 1
        failed = {stream.seq.seq_id for stream in failed_starts}
        buf.op_status[:len(plan.ops)] = [int(op.kind == OpKind.START and op.seq in failed) for op in plan.ops]
        buf.out_header[:2] = status, j
        buf.set_message("llama_decode returned 1" if status != STATUS_OK else "")
        deliveries = []
        self.outputs.process(plan, buf, deliveries)
        return dict(deliveries)

    def close(self):
        self.buf.unlink()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def test_text_streams_and_end_of_generation_ends_without_its_text(h):
    s = h.submit(max_tokens=20)
    assert h.step({s: tokens("H")})[s].text == "H"
    out = h.step({s: tokens("i")})[s]
    assert (out.text, out.token_ids, out.finish_reason) == ("i", tokens("i"), None)
    out = h.step({s: [EOG]})[s]
    assert (out.text, out.finish_reason, out.completion_tokens, out.prompt_tokens) == ("", "stop", 3, 3)
    assert s.seq not in h.sched.workers[0].running and h.outputs.generated_tokens == 3


def test_a_character_split_across_tokens_is_sent_whole(h):
    s = h.submit(max_tokens=20)
    assert h.step({s: [128]})[s].text == ""
    assert h.step({s: [129]})[s].text == "é"


def test_max_tokens_ends_with_length(h):
    s = h.submit(max_tokens=2)
    h.step({s: tokens("a")})
    out = h.step({s: tokens("b")})[s]
    assert (out.finish_reason, out.text, out.completion_tokens) == ("length", "b", 2)


def test_a_stop_string_inside_a_burst_ends_it_and_what_the_burst_sampled_past_it_is_dropped(h):
    s = h.submit(max_tokens=100, stop=["END"])
    bursts = []
    while not bursts or bursts[-1] < 6:  # bursts grow with the answer
        h.step({s: tokens("ab" * 8)}, max_burst=8)
        bursts.append(h.plan.burst)
    before = s.seq.n_generated
    out = h.step({s: tokens("xyEND") + tokens("zzz")}, max_burst=8)[s]
    assert h.plan.burst >= 6 and out.finish_reason == "stop"
    assert out.text == "xy" and out.token_ids == tokens("xyEND")  # the stop string is not sent
    assert s.seq.n_generated == before + 5 and out.completion_tokens == before + 5  # nor what came after it
    assert bursts[0] == 1 and len(set(bursts)) > 2


def test_logprobs_are_read_from_each_burst_slot(h):
    s = h.submit(max_tokens=20, top_logprobs=2)
    out = h.step({s: tokens("a")}, logprobs={s: [(-0.5, [(ord("a"), -0.5), (ord("b"), -1.5)])]})[s]
    assert out.logprobs == [TokenLogprob(ord("a"), "a", -0.5, [(ord("a"), "a", -0.5), (ord("b"), "b", -1.5)])]
    plain = h.submit(max_tokens=20)
    outs = h.step({s: tokens("c"), plain: tokens("d")}, logprobs={s: [(-0.25, [(ord("c"), -0.25), (1, -3.0)])]})
    assert outs[s].logprobs[0].top == [(ord("c"), "c", -0.25), (1, "\x01", -3.0)] and outs[plain].logprobs == []


def test_a_failed_step_ends_its_sequences_with_the_worker_s_message(h):
    a, b = h.submit(max_tokens=20), h.submit(prompt=(7, 8, 9), max_tokens=20)
    outs = h.step({a: [], b: []}, status=STATUS_DECODE_FAILED)
    assert {outs[a].finish_reason, outs[b].finish_reason} == {"error"}
    assert outs[a].error == "llama_decode returned 1" and h.sched.running == 0


def test_a_sequence_whose_sampler_could_not_start_ends_with_an_error(h):
    a, b = h.submit(max_tokens=20), h.submit(prompt=(7, 8, 9), max_tokens=20)
    outs = h.step({a: tokens("x"), b: tokens("y")}, failed_starts=(a,))
    assert outs[a].finish_reason == "error"
    assert (OpKind.FREE, a.seq.seq_id) in [(op.kind, op.seq) for op in h.sched.workers[0].pending_ops]
    assert (outs[b].text, outs[b].finish_reason) == ("y", None)


def test_each_token_of_a_burst_gets_its_own_logprobs(h):
    s = h.submit(max_tokens=100, top_logprobs=1)
    while h.step({s: tokens("a" * 8)}, max_burst=8) and h.plan.burst < 2:
        pass
    slots = [(-0.1 * (i + 1), [(ord("a") + i, -0.1 * (i + 1))]) for i in range(8)]
    out = h.step({s: tokens("abcdefgh")}, max_burst=8, logprobs={s: slots})[s]
    n = h.plan.burst
    assert n >= 3 and [lp.token for lp in out.logprobs] == tokens("abcdefgh")[:n]
    assert [lp.logprob for lp in out.logprobs] == pytest.approx([-0.1 * (i + 1) for i in range(n)])
    assert [lp.top[0][1] for lp in out.logprobs] == list("abcdefgh"[:n])
