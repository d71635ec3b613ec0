"""A draft model (engine/draft_model.py, --model-draft): the vocabulary check at start, and with the
real model drafting for itself (the only model here: SmolLM2-135M, so its drafts are nearly always
right): drafted greedy answers equal plain ones in both KV layouts and through both doors."""

import pytest

from engine.config import EngineConfig
from engine.model_files import ensure_default_model
from engine.request import Request
from engine.sampling import SamplingParams
from loadtest.draft_files import derived_model
from test_speculative import PROMPTS, TEXT, grpc_answer, tokens_of


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """The model's vocabulary with one token renamed (no tensors: the check reads vocabularies only)."""
    path = tmp_path_factory.mktemp("draft") / "other-vocab.gguf"
    return derived_model(ensure_default_model(), path, token_texts={1000: "<|not-in-the-model|>"}, tensors=False)


@pytest.mark.unit
def test_spec_type_draft_needs_a_draft_model():
    with pytest.raises(ValueError, match="--spec-type draft needs a draft model"):
        EngineConfig(model_path="model.gguf", spec_type="draft")


@pytest.mark.model
def test_a_draft_model_with_another_vocabulary_is_refused(mismatched):
    model = str(ensure_default_model())
    with pytest.raises(ValueError, match=r"its token 1000 is '<\|not-in-the-model\|>', the model's is '\(\)'"):
        EngineConfig(model_path=model, spec_type="draft", model_draft=str(mismatched))
    assert EngineConfig(model_path=model, spec_type="draft", model_draft=model).model_draft == model


@pytest.mark.service
def test_the_service_exits_before_serving_with_a_mismatched_draft_model(start_server, mismatched):
    service = start_server("--model-draft", str(mismatched), "--spec-type", "draft", wait=False)
    assert service.process.wait(timeout=120) != 0
    log = service.log()
    assert "--model-draft" in log and "token 1000" in log and "vocabulary of the model" in log


# --- the model drafting for itself ---

def greedy(h, question, **kw):
    return Request(prompt=h.prompt(question), sampling=SamplingParams(temperature=0), max_tokens=64, **kw)


@pytest.mark.model
@pytest.mark.parametrize("kv_unified", [False, True])
def test_self_drafted_greedy_answers_equal_plain_and_are_accepted(kv_unified):
    """Every prompt alone and all together, drafted by the draft model and not. Drafts are rejected only
    past an answer's end (where the target ends and the draft goes on) or at a near-tie that batch
    shapes decide differently."""
    from test_engine import EngineHarness
    model = str(ensure_default_model())
    h = EngineHarness(parallel=4, threads=2, kv_unified=kv_unified, ctx_size=8192 if kv_unified else 0,
                      spec_type="draft-always", spec_draft_max=8, model_draft=model)
    try:
        questions = PROMPTS[:4] if not kv_unified else PROMPTS[:2]
        plain = [tokens_of(h, [greedy(h, q, spec_type="none")])[0] for q in questions]
        before = h.stats()["speculative"]
        assert [tokens_of(h, [greedy(h, q)])[0] for q in questions] == plain
        assert tokens_of(h, [greedy(h, q) for q in questions]) == plain  # the sequences draft in one batch
        spec = h.stats()["speculative"]
        drafted, accepted = spec["drafted"] - before["drafted"], spec["accepted"] - before["accepted"]
        lost = (2 * len(questions) + 1) * 8  # at most a draft at each answer's end, and one near-tie
        assert drafted > 100 and accepted >= drafted - lost and spec["acceptance"]["draft"] > 0.75
        assert spec["acceptance"]["ngram"] is None and spec["draft_s"] > 0
        assert h.wait_idle()["kv_running"] == 0
    finally:
        h.close()


@pytest.mark.service
def test_both_doors_ask_for_the_draft_model(start_server):
    import openai

    model = str(ensure_default_model())
    service = start_server("--parallel", "2", "--ctx-size", "2048", "--spec-type", "auto", "-md", model)
    question = "Repeat this text exactly, word for word:\n\n" + TEXT

    def by_model() -> dict:
        spec = service.stats()["speculative"]
        return {"accepted": spec["accepted"], "acceptance": spec["acceptance"]["draft"]}

    plain = grpc_answer(service, question, {"speculative": False}, 48)
    assert by_model()["accepted"] == 0  # auto is n-gram only: the draft model drafts only when asked
    assert grpc_answer(service, question, {"spec": {"type": "draft-always", "draft_max": 6}}, 48) == plain
    after_grpc = by_model()
    assert after_grpc["accepted"] > 20 and after_grpc["acceptance"] > 0.75
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    http = client.chat.completions.create(model="x", temperature=0, max_tokens=48,
                                          extra_body={"spec": {"type": "draft-always", "draft_max": 6}},
                                          messages=[{"role": "user", "content": question}])
    assert http.choices[0].message.content == plain and by_model()["accepted"] > after_grpc["accepted"]
