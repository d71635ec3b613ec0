"""The tenants file (server/tenants.py): overrides on the flags' limits, a bad file refused whole; the
tenant metrics' bounded label."""

import pytest

from engine.fair_queue import TenantLimits
from server.metrics import TOP_TENANTS, _tenant_series
from server.tenants import Tenants

pytestmark = pytest.mark.unit


class FakeEngine:
    def set_tenant_limits(self, default, overrides):
        self.limits = (default, overrides)


def test_overrides_take_the_flags_for_what_they_leave_out(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[tenants.acme]\nmax_running = 4\npriority = -2\nweight = 1.5\n[tenants."b c"]\n')
    t = Tenants(TenantLimits(max_running=8, max_waiting=16), str(path))
    assert t.overrides == {"acme": TenantLimits(4, 16, -2, 1.5), "b c": TenantLimits(8, 16)}


@pytest.mark.parametrize("text, error", [
    ("[tenants.a]\nmax_runing = 1\n", "unknown key 'max_runing'"),
    ("[tenants.a]\nmax_running = 0\n", "max_running must be a whole number above 0"),
    ("[tenants.a]\nweight = 'x'\n", "weight must be a number above 0"),
    ("[tenants.a]\nmax_waiting = 1.5\n", "max_waiting must be a whole number"),
    ("[other]\n", "only [tenants.<id>] tables"),
    ("[tenants.a\n", "tenants file"),
])
def test_a_bad_file_stops_the_start_and_a_bad_reload_keeps_the_old(tmp_path, text, error, caplog):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error.replace("[", r"\[")):
        Tenants(TenantLimits(), str(path))
    path.write_text("[tenants.a]\nmax_running = 2\n")
    t, engine = Tenants(TenantLimits(), str(path)), FakeEngine()
    path.write_text(text)
    assert not t.reload([engine]) and t.overrides == {"a": TenantLimits(max_running=2)}
    assert error.split("[")[0] in caplog.text and not hasattr(engine, "limits")
    path.write_text("[tenants.a]\nmax_running = 3\n")
    assert t.reload([engine]) and engine.limits[1] == {"a": TenantLimits(max_running=3)}


def test_the_tenant_label_keeps_the_top_tenants_and_sums_the_rest_as_other():
    row = dict(running=1, waiting=0, tokens_in=5, tokens_out=0, preempted=0, refused=0, requests=2,
               queue_seconds=0.5, first_tokens=2, ttft_seconds=1.0)
    tenants = {f"t{i}": {**row, "tokens_out": i} for i in range(TOP_TENANTS + 30)}
    running = next(f for f in _tenant_series(tenants) if f.name == "sentiric_tenant_running")
    values = {s.labels["tenant"]: s.value for s in running.samples}
    assert len(values) == TOP_TENANTS + 1 and values["other"] == 30 and f"t{TOP_TENANTS + 29}" in values
    ttft = next(f for f in _tenant_series(tenants) if f.name == "sentiric_tenant_ttft_seconds")
    other = {s.name: s.value for s in ttft.samples if s.labels["tenant"] == "other"}
    assert other == {"sentiric_tenant_ttft_seconds_count": 60, "sentiric_tenant_ttft_seconds_sum": 30.0}
    admitted = next(f for f in _tenant_series(tenants) if f.name == "sentiric_tenant_requests")
    assert {s.labels["tenant"]: s.value for s in admitted.samples}["other"] == 60
