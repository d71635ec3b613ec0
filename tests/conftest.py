"""The `server` fixture: the real service (`python -m server`) in its own
process on a loopback port, with the real model, as clients see it."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loadtest.servers import free_ports

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("unit", "model", "service", "browser")  # what a test needs (pyproject.toml's markers)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test carries its kind, so `-m unit` (the quick lane) and the others select the whole suite."""
    unmarked = [item.nodeid for item in items if not any(item.get_closest_marker(kind) for kind in KINDS)]
    if unmarked:
        raise pytest.UsageError(f"{len(unmarked)} tests carry no kind ({', '.join(KINDS)}; a module's "
                                f"`pytestmark`): {', '.join(unmarked[:5])}")


def free_port() -> int:
    return free_ports(1)[0]


class ServiceProcess:
    """A running `python -m server`; its stderr goes to a log file tests can read."""

    def __init__(self, *flags: str, log_dir: Path, env: dict | None = None, wait: bool = True):
        self.port, self.grpc_port = free_ports(2)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--grpc-port", str(self.grpc_port), *flags]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self.pid = self.process.pid
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.log()}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stats(self) -> dict:
        return json.loads(self.get("/stats")[1])

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def wait_idle(self, timeout: float = 30) -> dict:
        """/stats once nothing runs or waits and no running sequence holds KV cells."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0 and s["kv_running"] == 0:
                return s
            time.sleep(0.05)
        return self.stats()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Start extra services with their own flags; all are stopped at the end of the session."""
    started = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(*flags, **kw):
        service = ServiceProcess(*flags, log_dir=log_dir, **kw)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def server(start_server):
    """The service on the default model in its default KV layout (split): 8 sequences of 4096 KV cells, 2 threads."""
    return start_server("--parallel", "8", "--ctx-size", "32768", "--max-n", "4")


# thinks first: the generation prompt opens the section, as DeepSeek-R1 distills' templates do
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
                     "{% if reasoning_effort %}Effort: {{ reasoning_effort }}\n{% endif %}"
                     "{% if persona %}Persona: {{ persona }}\n{% endif %}{% endif %}")
# the answer shape is forced by a grammar, so the 135M model writes a thinking section and an answer
THOUGHT = {"grammar": 'root ::= [a-z ]{8,40} "\\n</think>\\n\\n" [A-Z] [a-z ]{4,30} "."', "temperature": 0}


@pytest.fixture(scope="session")
def thinking_service(start_server, tmp_path_factory):
    """A service whose chat template opens a thinking section (THINKING_TEMPLATE)."""
    path = tmp_path_factory.mktemp("template") / "thinking.jinja"
    path.write_text(THINKING_TEMPLATE)
    return start_server("--parallel", "2", "--ctx-size", "2048", "--chat-template-file", str(path))
