"""Speculative decoding (engine/speculative.py): the n-gram index, the load-aware choice, the scheduler's
bookkeeping of a draft, and with the real model: drafted greedy answers equal undrafted ones, stop
strings, grammars, logprobs and cancellation inside drafts."""

import asyncio
import json
import re
import urllib.request
from dataclasses import replace

import pytest

from engine.request import Request
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculative import PREDICTION, CostModel, NgramIndex, SeqSpec, Speculator, choose_drafts
from engine.worker_state import WorkerState
from server.fields import Fields
from server.generation_params import prediction, speculation
from server.refusal import Refusal

TEXT = ("The committee met on Tuesday to review the budget for the new library. After a long discussion "
        "the members agreed to fund the reading room, the children's corner and the archive, and asked the "
        "treasurer to report again in March. ")


@pytest.mark.unit
def test_ngram_index_proposes_what_followed_the_latest_match():
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2]
    index = NgramIndex(tokens)
    assert index.propose(3) == (2, [3, 7, 8])  # the latest "1 2" was followed by 3 7 8
    tokens += [3]
    assert index.propose(2) == (3, [7, 8])     # "1 2 3": its latest earlier occurrence
    assert NgramIndex([5, 6, 7]).propose(4) == (0, [])


@pytest.mark.unit
def test_the_longest_key_wins_over_a_later_short_match():
    quote = list(range(100, 112))  # a 12-token passage, then its next token, 50
    tokens = quote + [50] + [0] + quote[-4:] + [60] + [1] + quote
    assert NgramIndex(tokens).propose(2) == (12, [50, 0])  # not 60: the 4-token tail's latest match


@pytest.mark.unit
def test_every_proposal_is_scored_up_to_its_first_wrong_token_by_key_length():
    spec = SeqSpec("auto", 8)
    spec.propose(2, [10, 11, 12], 8)
    spec.propose(2, [10, 11, 13], 8)                # one proposal per position
    spec.propose(3, [11, 12, 14], 2)
    assert spec.score([0, 1, 10]) == []             # right so far: wait for more
    assert spec.score([0, 1, 10, 11, 99]) == [(8, 2, 3), (2, 1, 2)]
    assert spec.pending == [] and spec.record.counts[8] == [1, 1, 1, 2]  # first right; next: 1 of 2
    assert spec.record.rates(8, (0.5, 0.5)) == pytest.approx(((1 + 2) / 5, (1 + 2) / 6))
    assert spec.record.rates(4, (0.5, 0.5)) == (0.5, 0.5)  # another key length: still the prior


@pytest.mark.unit
def test_a_sequence_whose_long_matches_come_true_drafts_its_whole_proposal():
    """This CPU's costs (2-core EPYC, 135M Q4_1: one row 9.4 ms, 17 rows 89 ms, all with logits): a
    sequence whose 12-token matches kept coming true drafts all 16 proposed tokens, though its 2-token
    matches failed (one rate for all its proposals drafted 3); one whose long matches failed does not."""
    speculator = Speculator("auto", 16)
    speculator.costs[0] = cost = CostModel()
    for rows in (1, 17) * 10:
        cost.observe(rows, 0.0046 + 0.005 * rows)
    text = list(range(100, 300))  # the prompt's text, of which the answer has copied 12 tokens so far
    seq = Sequence(Request(prompt=text + text[:12], max_tokens=500))
    seq.spec = speculator.settings_for(None, None)
    for _ in range(10):
        seq.spec.record.add(2, 0, 1)
    room = {seq: 16}
    for _ in range(6):  # six proposals of 16 tokens from a 12-token key, each came true
        speculator.choose(0, [seq], 1, room)
        copied = len(seq.tokens) - len(text)
        seq.tokens += text[copied:copied + 16]
        speculator.scored(seq)
    assert seq.spec.record.counts[12] == [6, 6, 90, 90]
    one_rate = (96 + 2) / (106 + 4)
    assert choose_drafts([(one_rate, one_rate, 16, False)], 1, *cost.line(), speculator.gap_s) == [3]
    copied = len(seq.tokens) - len(text)
    assert speculator.choose(0, [seq], 1, room) == [(seq, text[copied:copied + 16], "ngram")]
    wrong = Sequence(Request(prompt=text + text[:12], max_tokens=500))
    wrong.spec = speculator.settings_for(None, None)
    for _ in range(5):
        wrong.spec.record.add(12, 0, 1)  # its long matches failed at once
    assert speculator.choose(0, [wrong], 1, {wrong: 16}) == []


@pytest.mark.unit
def test_cost_model_fits_rows_and_falls_back_to_its_prior_shape():
    cost = CostModel()
    assert cost.line() is None
    cost.observe(1, 0.010)
    a, b = cost.line()
    assert a + b == pytest.approx(0.010) and b > 0  # one size seen: the prior's share per row
    for rows in (1, 5, 9, 17) * 5:
        cost.observe(rows, 0.006 + 0.003 * rows)
    a, b = cost.line()
    assert a == pytest.approx(0.006, abs=1e-4) and b == pytest.approx(0.003, abs=1e-4)


@pytest.mark.unit
def test_drafting_pays_at_one_stream_and_turns_itself_off_under_load():
    a, b, gap = 0.006, 0.0027, 0.0005  # this CPU's figures: a 5-row decode costs ~3x a 1-row one
    assert sum(choose_drafts([(0.9, 0.9, 16, False)], 1, a, b, gap)) >= 4
    assert choose_drafts([(0.3, 0.3, 16, False)], 1, a, b, gap) == [0]          # unlikely drafts cost more than they give
    assert choose_drafts([(0.8, 0.8, 16, False)] * 2, 16, a, b, gap) == [0, 0]  # a full step has no room for them
    assert choose_drafts([(0.1, 0.1, 5, True)], 16, a, b, gap) == [5]           # forced (spec type ngram)
    assert sum(choose_drafts([(0.99, 0.99, 16, False)], 1, a, 0.0, gap)) == 16  # rows for free (a GPU): draft all
    assert choose_drafts([(0.8, 0.999, 16, False)], 1, a, b, gap) == [16]       # a right head runs on


def plan_one(spec_type="ngram", max_tokens=50):
    w = WorkerState(0, 4096, 4, 0)
    w.alive = True
    sched = Scheduler([w], max_waiting=8, step_tokens=64, reserve_cap=256, speculator=Speculator(spec_type, 4))
    seq = sched.add(Request(prompt=[1, 2, 3, 4, 1, 2, 3], max_tokens=max_tokens))
    (plan,) = sched.plan()
    sched.complete(plan, [[4]])  # prefill: "... 1 2 3" sampled 4, so "4 1 2 3" is proposed next
    return sched, w, seq


@pytest.mark.unit
def test_a_draft_is_planned_whole_and_what_was_rejected_is_given_back():
    sched, w, seq = plan_one()
    (plan,) = sched.plan()
    (row,) = plan.rows
    assert row.draft == [1, 2, 3, 4] and row.count == 5 and plan.stride == 5 and plan.drafting
    assert sched.plan() == []  # nothing after a drafting step until it completes
    used = w.ledger.used
    sched.complete(plan, [[1, 2, 9]])  # two drafted tokens accepted, the third corrected
    assert seq.tokens[-3:] == [1, 2, 9] and seq.n_computed == seq.n_scheduled == 10 == len(seq.tokens) - 1
    assert w.ledger.used == used - 2 and not w.unsettled
    assert sched.speculator.stats.drafted == 4 and sched.speculator.stats.accepted == 2


@pytest.mark.unit
def test_a_plan_is_held_back_only_when_the_next_step_could_draft():
    """holds() judges the next step with draft()'s room: a sequence whose max_tokens leaves nothing to
    draft after its step in flight is planned at once (it was held, holds() assuming the full
    draft_max, and then did not draft)."""
    for max_tokens, held in ((3, False), (50, True)):
        sched, w, seq = plan_one("ngram", max_tokens)
        seq.n_scheduled += 1  # a plain step in flight: its row samples output 2
        seq.outputs_planned += 1
        assert sched.speculator.holds(w, sched.step_tokens) is held
        seq.n_computed += 1
        seq.tokens.append(1)
        (plan,) = sched.plan()
        assert plan.drafting is held


@pytest.mark.unit
def test_a_sequence_that_may_not_draft_overlaps_as_before():
    sched, w, seq = plan_one("none")
    (first,) = sched.plan()
    (second,) = sched.plan()  # planned while the first is in flight
    assert not first.rows[0].draft and seq.spec is None and second.rows[0].start == first.rows[0].start + 1


@pytest.mark.unit
def test_a_prediction_is_proposed_while_the_answer_follows_it_then_by_lookup():
    prompt, pred = [1, 2, 3], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    spec = Speculator("none", 4).settings_for(None, None, pred)
    assert spec.mode == "auto" and not spec.own  # a service without n-gram drafts still drafts a prediction
    tokens = prompt + [10, 11]
    assert spec.lookup(tokens, 3, 4) == (PREDICTION, [12, 13, 14, 15])  # the answer so far is its start
    tokens += [12, 99, 14, 15, 16]  # the answer left it, then took it up again
    assert spec.lookup(tokens, 3, 2) == (PREDICTION, [17, 18]) and spec.aligned == -1
    tokens += [50, 51]  # nowhere in the prediction, and no own lookup
    assert spec.lookup(tokens, 3, 2) == (0, [])
    both = Speculator("auto", 4).settings_for(None, None, pred)
    assert both.own and both.lookup(prompt + [7, 1, 2], 3, 4) == (2, [3, 7, 1, 2])  # its own tokens as before
    assert Speculator("auto", 4).settings_for("none", None, pred) is None  # the request turned drafting off
    assert Speculator("none", 0).settings_for(None, None, pred) is None


@pytest.mark.unit
def test_bad_prediction_fields_name_the_field():
    assert prediction(Fields({})) is None
    assert prediction(Fields({"prediction": {"type": "content", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]}})) == "ab"
    for body, field in (({"prediction": "x"}, "prediction"), ({"prediction": {"type": "text", "content": "x"}},
                                                              "prediction.type"),
                        ({"prediction": {"type": "content", "content": [{"type": "image"}]}}, "prediction.content"),
                        ({"prediction": {"type": "content"}}, "prediction.content")):
        with pytest.raises(Refusal) as err:
            prediction(Fields(body))
        assert err.value.param == field and field in str(err.value)


@pytest.mark.unit
def test_bad_spec_fields_name_the_field():
    assert speculation(Fields({"speculative": False})) == ("none", None)
    assert speculation(Fields({"spec": {"type": "ngram", "draft_max": 4}})) == ("ngram", 4)
    assert speculation(Fields({"spec": {"type": "draft"}}), draft_model=True) == ("draft", None)
    for body, field in (({"spec": {"type": "eagle"}}, "spec.type"), ({"spec": {"type": "draft"}}, "spec.type"), ({"spec": {"draft_max": -1}}, "spec.draft_max"),
                        ({"spec": "on"}, "spec"), ({"speculative": "no"}, "speculative"),
                        ({"spec": {"k": 3}}, "spec.k")):
        with pytest.raises(Refusal) as err:
            speculation(Fields(body))
        assert err.value.param == field and field in str(err.value)


# --- with the real model ---

@pytest.fixture(scope="module")
def eng():
    from test_engine import EngineHarness
    h = EngineHarness(parallel=4, threads=2, spec_type="ngram", spec_draft_max=8)
    yield h
    h.close()


def copying(h, **kw):
    question = "Repeat this text exactly, word for word:\n\n" + TEXT * 2
    return Request(prompt=h.prompt(question), **{"sampling": SamplingParams(temperature=0), "max_tokens": 96, **kw})


def tokens_of(h, requests):
    async def one(r):
        return [t for o in [o async for o in h.engine.generate(r)] for t in o.token_ids]

    async def all_of():
        return await asyncio.gather(*(one(r) for r in requests))
    return h.run(all_of())


PROMPTS = ["Repeat this text exactly:\n\n" + TEXT, "Summarise in one sentence:\n\n" + TEXT,
           "List the things the committee agreed to fund, one per line:\n\n" + TEXT,
           "What is the capital of France? Answer in a full sentence.", "Count from one to twenty in words.",
           "Write the alphabet in capital letters separated by commas."]


@pytest.mark.model
def test_greedy_with_drafts_equals_without(eng):
    """Every prompt alone, drafted and not: llama.cpp computes a draft's positions in one batch where the
    undrafted run computes them one by one, so the numerics may differ; on these prompts they agree."""
    before = eng.stats()["speculative"]
    drafted = [tokens_of(eng, [Request(prompt=eng.prompt(q), sampling=SamplingParams(temperature=0), max_tokens=80)])[0]
               for q in PROMPTS]
    plain = [tokens_of(eng, [Request(prompt=eng.prompt(q), sampling=SamplingParams(temperature=0), max_tokens=80,
                                     spec_type="none")])[0] for q in PROMPTS]
    after = eng.stats()["speculative"]
    assert after["accepted"] - before["accepted"] > 50  # the drafts were used, and mostly right
    assert drafted == plain


@pytest.mark.model
def test_concurrent_drafts_with_logprobs_match_alone(eng):
    reqs = [copying(eng, top_logprobs=2), replace(copying(eng), prompt=eng.prompt("Count from one to twenty in words."))]
    alone = [tokens_of(eng, [r])[0] for r in reqs]
    assert tokens_of(eng, reqs) == alone

    async def logprobs():
        return [lp for o in [o async for o in eng.engine.generate(copying(eng, top_logprobs=2))] for lp in o.logprobs]
    lps = eng.run(logprobs())
    assert [lp.token for lp in lps] == alone[0] and all(lp.logprob <= 0 and len(lp.top) == 2 for lp in lps)
    assert all(lp.token == lp.top[0][0] for lp in lps)  # greedy: every accepted token is the best one


@pytest.mark.model
def test_a_stop_string_inside_an_accepted_draft_ends_there(eng):
    async def run():
        outs = [o async for o in eng.engine.generate(copying(eng, stop=["reading room"]))]
        return "".join(o.text for o in outs), outs[-1]
    before = eng.stats()["speculative"]["accepted"]
    text, last = eng.run(run())
    assert last.finish_reason == "stop" and text.endswith("fund the ") and "reading" not in text
    assert eng.stats()["speculative"]["accepted"] > before


@pytest.mark.model
def test_grammar_output_stays_valid_with_drafts(eng):
    grammar = 'start: "{\\"items\\": [" item (", " item)* "]}"\nitem: "\\"" /[a-z ]+/ "\\""'  # llguidance's lark
    question = ('Put the things the committee funded in JSON like {"items": ["x", "y"]}. ' + TEXT)
    req = Request(prompt=eng.prompt(question), sampling=SamplingParams(temperature=0, grammar=grammar), max_tokens=60)
    async def run():
        return "".join([o.text async for o in eng.engine.generate(req)])
    text = eng.run(run())
    assert json.loads(text)["items"]


@pytest.mark.model
def test_cancel_during_drafting_frees_the_kv(eng):
    async def cancel_midway():
        gen = eng.engine.generate(copying(eng, max_tokens=400))
        n = 0
        async for out in gen:
            n += len(out.token_ids)
            if n >= 10:
                break
        await gen.aclose()
    steps = eng.stats()["speculative"]["steps_drafting"]
    eng.run(cancel_midway())
    stats = eng.wait_idle()
    assert stats["running"] == 0 and stats["kv_running"] == 0
    assert stats["speculative"]["steps_drafting"] > steps


@pytest.mark.model
def test_unified_kv_drafts_equal_plain():
    from test_engine import EngineHarness
    h = EngineHarness(parallel=2, threads=2, kv_unified=True, ctx_size=4096, spec_type="ngram")
    try:
        drafted, plain = (tokens_of(h, [copying(h, spec_type=t)])[0] for t in ("ngram", "none"))
        assert drafted == plain and h.stats()["speculative"]["accepted"] > 10
        assert h.wait_idle()["kv_running"] == 0
    finally:
        h.close()


def grpc_answer(service, question: str, engine: dict, max_new_tokens: int = 64) -> str:
    """The service's greedy answer through the gRPC door, with `engine` as engine_specific_params."""
    import grpc
    from server.proto import llama_pb2, llama_pb2_grpc
    params = llama_pb2.GenerationParams(temperature=0, max_new_tokens=max_new_tokens)
    params.engine_specific_params.update(engine)
    with grpc.insecure_channel(service.grpc_target) as channel:
        stream = llama_pb2_grpc.LlamaServiceStub(channel).GenerateStream(
            llama_pb2.GenerateStreamRequest(user_prompt=question, params=params), timeout=120)
        return b"".join(m.token for m in stream if m.WhichOneof("type") == "token").decode()


@pytest.mark.service
def test_both_doors_carry_a_requests_spec_and_drafted_answers_equal_plain(start_server):
    import openai

    service = start_server("--parallel", "2", "--ctx-size", "2048", "--spec-type", "ngram")
    question = "Repeat this text exactly, word for word:\n\n" + TEXT * 2

    def accepted() -> int:
        return service.stats()["speculative"]["accepted"]

    before = accepted()
    drafted = grpc_answer(service, question, {"spec": {"type": "ngram", "draft_max": 8}})
    assert accepted() - before > 10
    before = accepted()
    assert grpc_answer(service, question, {"speculative": False}) == drafted and accepted() == before
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    http = client.chat.completions.create(model="x", temperature=0, max_tokens=64, extra_body={"spec": {"draft_max": 8}},
                                          messages=[{"role": "user", "content": question}])
    assert http.choices[0].message.content == drafted and accepted() > before
    with pytest.raises(openai.BadRequestError, match="'spec.type' is draft, but this service has no draft model"):
        client.chat.completions.create(model="x", max_tokens=4, extra_body={"spec": {"type": "draft"}},
                                       messages=[{"role": "user", "content": "hi"}])


@pytest.mark.service
def test_a_predicted_answer_is_drafted_and_counted_in_usage(start_server):
    """OpenAI's Predicted Outputs on a service with n-gram drafting off: the prediction is
    drafted, the answer is the one without it (greedy), and usage says how much of it held."""
    import openai

    service = start_server("--parallel", "2", "--ctx-size", "2048", "--spec-type", "none")
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120)

    def ask(**kw):
        return client.chat.completions.create(model="x", temperature=0, max_tokens=80, messages=[
            {"role": "user", "content": "Repeat this text exactly, word for word:\n\n" + TEXT}], **kw)

    plain = ask()
    answer = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None and service.stats()["speculative"]["drafted"] == 0
    predicted = ask(prediction={"type": "content", "content": answer})
    details = predicted.usage.completion_tokens_details
    assert predicted.choices[0].message.content == answer
    assert details.accepted_prediction_tokens >= predicted.usage.completion_tokens // 4  # the rule drafts once it pays
    assert details.rejected_prediction_tokens <= details.accepted_prediction_tokens // 4
    assert predicted.model_extra["timings"]["draft_n_accepted"] == details.accepted_prediction_tokens
    metrics = urllib.request.urlopen(service.base_url + "/metrics").read().decode()
    exported = float(re.search(r'sentiric_spec_source_accepted_total\{source="prediction"\} (\S+)', metrics).group(1))
    assert exported == service.stats()["speculative"]["by_source"]["prediction"]["accepted"] > 0
    wrong = ask(prediction={"type": "content", "content": "Seven ships sailed north past the old lighthouse at dawn."},
                stream=True, stream_options={"include_usage": True})
    chunks = list(wrong)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens < 5
    with pytest.raises(openai.BadRequestError) as err:
        ask(prediction={"type": "text", "content": "x"})
    assert err.value.body["param"] == "prediction.type"
