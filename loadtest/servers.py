"""The servers the serving benchmark starts and stops itself: the service
under test, llama.cpp's llama-server and llama-cpp-python's server, with
equivalent settings, on free loopback ports, stopped by PID at the end; and
the memory of their process trees."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOADTEST = REPO / "loadtest"
DEFAULT_LLAMA_SERVER = REPO / "native" / "build" / "bin" / "llama-server"
LCP_VENV = LOADTEST / ".venv-lcp"
LCP_PIN = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp build_llama.sh pins

# How the service under test is started (--start-service). The service's CLI
# is owned by server/; adjust DEFAULT_SERVICE_CMD or pass --service-cmd.
# Placeholders: {python} {port} {grpc_port} {model} {threads} {parallel} {ctx_size}.
# The gRPC door gets a free port too: its default (16071) may be taken. The service
# keeps its own context size and KV layout (its defaults are what is measured);
# --ctx-size sizes the reference servers.
DEFAULT_SERVICE_CMD = ("{python} -m server --host 127.0.0.1 --port {port} --grpc-port {grpc_port} "
                       "--model {model} --threads {threads} --parallel {parallel}")


def service_command(template: str, *, port: int, grpc_port: int, model: str, threads: int, parallel: int,
                    ctx_size: int) -> list[str]:
    """The argv that starts the service under test (run from the repository root)."""
    values = dict(python=sys.executable, port=port, grpc_port=grpc_port, model=model, threads=threads,
                  parallel=parallel, ctx_size=ctx_size)
    return [tok.format(**values) for tok in shlex.split(template)]


def llama_server_command(binary: Path, *, port: int, model: str, threads: int, parallel: int,
                         ctx_size: int, unified_kv: bool = True, extra: str = "") -> list[str]:
    """llama-server with settings equivalent to the service: same model, threads,
    total context and parallel slots, continuous batching on (-cb when the build
    has it), one KV pool shared by all slots (-kvu: without it each slot only gets
    ctx/parallel tokens, too few for the long prompts), /metrics on."""
    helptext = _help_text(binary)
    cmd = [str(binary), "-m", model, "-t", str(threads), "-c", str(ctx_size), "-np", str(parallel),
           "--host", "127.0.0.1", "--port", str(port), "--metrics"]
    if _has_flag(helptext, "-cb"):
        cmd.append("-cb")
    if unified_kv and _has_flag(helptext, "-kvu"):
        cmd.append("-kvu")
    cmd += shlex.split(extra)
    return cmd


def lcp_command(python: Path, *, port: int, model: str, threads: int, ctx_size: int,
                extra: str = "") -> list[str]:
    """llama-cpp-python's OpenAI server (no continuous batching: one request at a time). Its default
    interrupt_requests cuts off a running stream when the next request arrives; turned off, the
    others queue, so the comparison measures waiting instead of counting broken streams."""
    return [str(python), "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
            "--n_ctx", str(ctx_size), "--host", "127.0.0.1", "--port", str(port),
            "--interrupt_requests", "False"] + shlex.split(extra)


def add_side_by_side_options(p, *, parallel: int) -> None:
    """The options of a benchmark that starts the service and llama-server in turn, with the same model,
    threads and slots (side_by_side_argv)."""
    p.add_argument("--model", help="GGUF path (default: the service's default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=parallel)
    p.add_argument("--ctx-size", type=int, default=16384, help="llama-server's context")
    p.add_argument("--llama-server-bin", default=str(DEFAULT_LLAMA_SERVER))
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--log-dir", default=str(LOADTEST / "results" / "logs"))


def side_by_side_argv(name: str, args, model: str, port: int, grpc_port: int) -> list[str]:
    """The argv of "sentiric" (the service with its defaults) or "llama-server" under those options."""
    if name == "sentiric":
        return service_command(DEFAULT_SERVICE_CMD, port=port, grpc_port=grpc_port, model=model, threads=args.threads,
                               parallel=args.parallel, ctx_size=args.ctx_size)
    return llama_server_command(Path(args.llama_server_bin), port=port, model=model, threads=args.threads,
                                parallel=args.parallel, ctx_size=args.ctx_size)


def _help_text(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _has_flag(helptext: str, flag: str) -> bool:
    return re.search(rf"(^|[\s,]){re.escape(flag)}([\s,]|$)", helptext, re.M) is not None


def resolve_model(path: str | None) -> str:
    """--model, or the project's default model (fetched once, like the service does)."""
    from engine.model_files import resolve_model as _resolve
    try:
        return str(Path(_resolve(path)).resolve())
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(f"bench_serving: {e}")


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that were free a moment ago (held together, so never the same twice)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ManagedServer:
    """A server process started by the benchmark, stopped by PID at the end."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path,
                 health_paths: tuple[str, ...] = ("/health",), cwd: Path = REPO,
                 env: dict | None = None) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.health_paths = health_paths
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = open(self.log_path, "wb")
        print(f"[bench] starting {name}: {shlex.join(argv)}  (log: {self.log_path})", flush=True)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(cwd),
                                     env=env, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was "
                                   f"ready; last log lines:\n{self.log_tail()}")
            for path in self.health_paths:
                try:
                    with urllib.request.urlopen(self.base_url + path, timeout=2) as r:
                        if r.status == 200:
                            print(f"[bench] {self.name} ready at {self.base_url} (pid {self.proc.pid})",
                                  flush=True)
                            return
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; last log lines:\n{self.log_tail()}")

    def memory(self) -> dict:
        return tree_memory(self.proc.pid)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        print(f"[bench] stopped {self.name} (pid {self.proc.pid}, exit {self.proc.returncode})", flush=True)


def tree_pids(root: int) -> list[int]:
    """root and its descendants. Children are read per thread: a start-up thread spawns the
    workers, so they are its children, not the main thread's."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except (OSError, ValueError):
                continue
    return pids


def process_info(pid: int) -> dict | None:
    """RSS and PSS (smaps_rollup), open fds and threads of one process; None once it is gone."""
    try:
        info = {"pid": pid, "fds": len(os.listdir(f"/proc/{pid}/fd"))}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                info[key.lower() + "_mib"] = round(int(rest.split()[0]) / 1024, 1)
        if "pss_mib" not in info:  # a zombie: nothing mapped any more
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                info["threads"] = int(line.split()[1])
        return info
    except (OSError, ValueError, IndexError):
        return None


def tree_memory(pid: int) -> dict:
    """Memory of a process and its descendants (the service's workers): the sum
    of PSS, which splits shared pages (model mmap, shared memory) between the
    processes that map them instead of counting them once per process, and of RSS."""
    infos = [i for i in map(process_info, tree_pids(pid)) if i is not None]
    return {"pids": len(infos), "pss_mib": round(sum(i["pss_mib"] for i in infos), 1),
            "rss_mib": round(sum(i["rss_mib"] for i in infos), 1)}


def ensure_lcp_venv(version: str) -> Path:
    """A venv under loadtest/.venv-lcp (gitignored) with llama-cpp-python[server].
    PyPI has only its source: pip compiles llama.cpp (10-20 minutes on 2 cores).
    Uses the sdist build_llama.sh cached when it is the same version."""
    py = LCP_VENV / "bin" / "python"
    if not py.exists():
        print(f"[bench] creating {LCP_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LCP_VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        from engine.model_files import cache_dir
        cached = cache_dir() / f"llama_cpp_python-{version}.tar.gz"
        spec = f"{cached}[server]" if cached.is_file() else f"llama-cpp-python[server]=={version}"
        print(f"[bench] pip install {spec} into {LCP_VENV} (compiles llama.cpp; be patient)", flush=True)
        env = dict(os.environ)
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=ON")
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", spec], check=True, env=env)
    return py
