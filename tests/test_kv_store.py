"""The KV store below the KV buffer (engine/kv_store.py), through the real service: a document's prefix
survives a restart and is restored instead of prefilled, evicted documents come back from the RAM tier,
replicas share the disk tier, bad files are refused and removed, the disk bound holds; and the
quantized KV cache types (--cache-type-k / --cache-type-v)."""

import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from engine import kv_file
from tests.conftest import ROOT

pytestmark = [pytest.mark.service, pytest.mark.slow]

FACT, CODE = "The access code for the vault is {code}.", "7391"
# every document is the fact among ~250 tokens of its own filler, so each is a distinct prefix
TOPICS = ["river", "mountain", "harbor", "forest", "desert", "glacier"]


def document(i: int) -> str:
    topic = TOPICS[i]
    filler = " ".join(f"The {topic} report, section {k}, notes the {topic} was calm and quiet that day."
                      for k in range(14))
    return f"{filler} {FACT.format(code=CODE)}"


def ask(service, i: int, question: str = "What is the access code for the vault?") -> tuple[str, int]:
    """The answer, and the prompt tokens the service prefilled for it (its /stats counter)."""
    before = service.wait_idle()["prompt_tokens_computed"]
    client = openai.OpenAI(base_url=service.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model="x", temperature=0, max_tokens=16,
        messages=[{"role": "system", "content": f"Answer from this document.\n{document(i)}"},
                  {"role": "user", "content": question}]).choices[0].message.content
    return answer, service.wait_idle()["prompt_tokens_computed"] - before


def store_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/*.kv"))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kv-store")


@pytest.fixture(scope="module")
def restarted(start_server, store_dir):
    """A service that answered document 0 and was stopped with SIGTERM, then a new one on the same store."""
    flags = ("--parallel", "2", "--ctx-size", "4096", "--kv-ram-mb", "64", "--kv-store", str(store_dir))
    first = start_server(*flags)
    answer, computed = ask(first, 0)
    assert CODE in answer and computed > 250
    first.stop()
    return start_server(*flags)


def test_a_restarted_service_answers_a_stored_document_without_prefilling_it_from_its_warmed_ram_tier(restarted, store_dir):
    assert len(store_files(store_dir)) == 1
    answer, computed = ask(restarted, 0, "Tell me the access code for the vault.")
    assert CODE in answer
    assert computed < 40  # only the new question: the document came from the store
    store = restarted.stats()["kv_store"]
    # warm start: the disk tier's most recent files were copied into the RAM tier at start
    assert store["warmed"] == 1 and store["hits_ram"] == 1 and store["restored_tokens"] > 250
    assert store["prefill_ms_saved"] > 10 * store["restore_ms"] > 0


def test_documents_evicted_from_the_kv_buffer_come_back_from_the_ram_tier(restarted):
    """Four documents through two sequences: the second pass restores each from RAM."""
    for i in range(1, 5):
        ask(restarted, i)
    hits = restarted.stats()["kv_store"]["hits_ram"]
    for i in range(1, 5):
        answer, computed = ask(restarted, i)
        assert CODE in answer and computed < 40
    store = restarted.stats()["kv_store"]
    assert store["hits_ram"] - hits == 4
    assert 0 < store["ram_bytes"] <= 64 << 20
    assert 'sentiric_kv_store_hits_total{tier="ram"}' in restarted.metrics()


def test_a_replica_sharing_the_disk_tier_reads_what_another_wrote_and_refuses_bad_files(
        restarted, start_server, store_dir):
    replica = start_server("--parallel", "2", "--ctx-size", "4096", "--kv-store", str(store_dir))
    for i in (1, 2, 3, 4):  # the first service wrote these while the replica was running
        answer, computed = ask(replica, i)
        assert CODE in answer and computed < 40
    assert replica.stats()["kv_store"]["hits_disk"] == 4
    # ask for document 5 twice more so that the first service evicts (stores) it: the replica reads it
    ask(restarted, 5)
    ask(restarted, 0)
    ask(restarted, 1)
    time.sleep(0.5)  # the copy into the disk tier runs off the step loop
    answer, computed = ask(replica, 5)
    assert CODE in answer and computed < 40

    files = store_files(store_dir)
    truncated, corrupted, foreign = files[0], files[1], files[2]
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    raw = bytearray(corrupted.read_bytes())
    raw[-5000] ^= 0xFF
    corrupted.write_bytes(bytes(raw))
    raw = bytearray(foreign.read_bytes())
    at = raw.index(b'"key":"') + len(b'"key":"')
    raw[at] = ord("a") if raw[at] != ord("a") else ord("b")  # another model's key, same length
    foreign.write_bytes(bytes(raw))
    before = replica.stats()["kv_store"]
    for i in range(6):
        answer, _ = ask(replica, i)
        assert CODE in answer
    after = replica.stats()["kv_store"]
    assert after["restore_failures"] - before["restore_failures"] + after["bad_files_removed"] >= 3
    for f in store_files(store_dir):  # the bad ones were removed (and written again, whole, on eviction)
        assert kv_file.read_header(str(f)).key == kv_file.read_header(str(store_files(store_dir)[0])).key
    assert "KV store:" in replica.log()


def test_the_disk_tier_keeps_within_its_bound_and_restores_into_a_unified_cache(start_server, tmp_path):
    bounded = start_server("--parallel", "1", "--ctx-size", "2048", "--kv-unified", "--kv-store", str(tmp_path),
                           "--kv-store-mb", "16")
    for i in range(5):  # each evicts the one before: four ~7 MB files for a 16 MiB bound
        ask(bounded, i)
    time.sleep(0.5)  # the copy into the disk tier runs off the step loop (asked at once, 3 was once computed)
    files = store_files(tmp_path)
    assert files and sum(f.stat().st_size for f in files) <= 16 << 20
    assert bounded.stats()["kv_store"]["disk_bytes"] <= 16 << 20
    answer, computed = ask(bounded, 3)  # among the newest: still on disk
    assert CODE in answer and computed < 40 and bounded.stats()["kv_store"]["hits_disk"] == 1, (
        computed, bounded.stats()["kv_store"], [(f.name, f.stat().st_size) for f in store_files(tmp_path)])


def test_q8_0_kv_starts_reports_its_type_and_answers(start_server):
    service = start_server("--parallel", "2", "--ctx-size", "4096", "--cache-type-k", "q8_0",
                           "--cache-type-v", "q8_0")
    health = service.get("/health")
    assert b'"kv_cache_type":{"k":"q8_0","v":"q8_0"}' in health[1]
    stats = service.stats()
    assert stats["kv_bytes_per_cell"] == 30 * 2 * 6 * 34  # 3 KV heads x 64 dims = 6 blocks of 34 bytes
    assert "K q8_0, V q8_0" in service.log()
    answer, _ = ask(service, 0)
    assert CODE in answer


@pytest.mark.parametrize("flags, named", [
    (("--cache-type-k", "q9_0"), "--cache-type-k q9_0"),
    (("--cache-type-v", "q8_0", "--flash-attn", "off"), "--cache-type-v q8_0"),
    (("--kv-store", "/proc/kv"), "--kv-store /proc/kv"),
])
def test_bad_kv_settings_are_refused_at_start_naming_the_flag(flags, named):
    done = subprocess.run([sys.executable, "-m", "server", "--port", "0", "--grpc-port", "0", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert named in done.stderr + done.stdout
