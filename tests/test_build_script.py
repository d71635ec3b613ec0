"""build_llama.sh keeps one build directory whose contents only grow: the README's two set-up commands,
in either order, never rebuild libllama or lose the reference tools."""

import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "native" / "build" / "bin"


def build(*flags) -> float:
    started = time.monotonic()
    done = subprocess.run(["./build_llama.sh", *flags], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - started


def test_plain_and_server_builds_in_any_order_redo_nothing():
    build("--server")  # the tests' set-up already built everything: a no-op, or whatever was missing
    library = (BIN / "libllama.so").resolve().stat().st_mtime_ns
    for flags in ((), ("--server",), ()):
        assert build(*flags) < 5
        assert (BIN / "llama-server").exists() and (BIN / "llama-batched-bench").exists()
    assert (BIN / "libllama.so").resolve().stat().st_mtime_ns == library


def test_help_names_the_backends():
    done = subprocess.run(["./build_llama.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--cuda" in done.stdout and "--server" in done.stdout
