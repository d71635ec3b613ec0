"""Tokens per minute per tenant (server/token_budget.py) on a clock the test moves."""

import pytest

from server.refusal import Refusal
from server.token_budget import MAX_TENANTS, TokenBudget

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_tenant_at_its_limit_waits_until_enough_of_its_minute_has_passed():
    clock = Clock()
    budget = TokenBudget(clock)
    budget.charge("a", 60)
    clock.now += 20
    budget.charge("a", 50)
    budget.admit("a", 111)                      # 110 used: one more fits
    budget.admit("b", 100)                      # another tenant is not held by a's tokens
    with pytest.raises(Refusal) as refused:
        budget.admit("a", 100)
    # the first 60 tokens leave the window 40 s from now, which brings a under 100
    assert refused.value.code == "tenant_tokens_exceeded" and refused.value.retry_after == 40
    assert "'a'" in str(refused.value) and "100 tokens per minute" in str(refused.value)
    clock.now += 40
    budget.admit("a", 100)
    assert budget.used("a") == 50
    clock.now += 20
    assert budget.used("a") == 0
    budget.admit("a", None)                     # no limit: never refused


def test_the_windows_of_tenants_that_stopped_asking_are_swept():
    clock = Clock()
    budget = TokenBudget(clock)
    for i in range(MAX_TENANTS):
        budget.charge(f"t{i}", 5)
    clock.now += 61
    budget.charge("new", 5)
    assert list(budget._used) == ["new"]
