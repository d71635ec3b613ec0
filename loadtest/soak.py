#!/usr/bin/env python3
"""Soak test of the service: mixed traffic at a fixed concurrency for minutes
or hours, with the memory, file descriptors and threads of every process of
its tree, the KV cache and tokens/s sampled as it runs, optional fault
injection (--chaos), and a verdict at the end: does memory keep growing after
the warm-up, does any request hang, does the KV cache go back to idle, does
the service still answer and stop cleanly.

  # start the service here, 5 minutes of traffic
  python loadtest/soak.py
  # with faults: workers killed and stopped, queue flooded, clients dropped, slow-loris bodies
  python loadtest/soak.py --duration 240 --chaos
  # a running service (its process tree is found from /stats' worker pids when it runs here)
  python loadtest/soak.py --base-url http://127.0.0.1:16070 --grpc-target 127.0.0.1:16071

See loadtest/README.md, "Soak (soak.py)".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import random
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import grpc  # noqa: E402

from loadtest import grpc_stream, prompts, report, servers  # noqa: E402
from loadtest.clients import first_model_id  # noqa: E402
from loadtest.openai_stream import StreamAccumulator, dumps  # noqa: E402
from loadtest.stats import percentile  # noqa: E402
from server.proto import llama_pb2_grpc  # noqa: E402

DEFAULT_MIX = "chat-stream:3,chat:2,shared:3,long:1,n2:1,json:1,cancel:1,grpc:3,embed:1"
FAULTS = ("kill", "stop", "flood", "drop", "slowloris")
# fds and threads may legitimately grow by a few after the warm-up (the event loop's default
# executor and gRPC's pools start threads lazily); more than this is reported as growth
COUNT_SLACK = 8
JSON_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
               "properties": {"city": {"type": "string", "maxLength": 30},
                              "country": {"type": "string", "maxLength": 30}}}


@dataclass
class Outcome:
    """One request as the client saw it; times are seconds since the soak started."""
    kind: str
    t_start: float
    t_end: float
    status: str                  # "ok", "cancelled" (the client walked away on purpose) or "error"
    error: str | None = None     # error kind: "HTTP 429", "gRPC UNAVAILABLE", "client: ...", "hung", ...
    detail: str = ""
    ttft: float | None = None
    tokens: int = 0
    fault: str | None = None     # sent by a fault (the flood), not by the steady traffic


# ---------------------------------------------------------------------------
# the service's process tree (/proc)
# ---------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def label_processes(root: int, worker_pids: list[int]) -> dict[str, int]:
    """label -> pid for the tree: "parent", "worker-I" (I = its index in /stats), else the command name."""
    out = {}
    for pid in servers.tree_pids(root):
        if pid == root:
            out["parent"] = pid
        elif pid in worker_pids:
            out[f"worker-{worker_pids.index(pid)}"] = pid
        else:
            try:
                out[Path(f"/proc/{pid}/comm").read_text().strip() + f"-{pid}"] = pid
            except OSError:
                continue
    return out


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------

async def http_chat(session: aiohttp.ClientSession, base_url: str, body: dict,
                    cancel_after: int | None = None) -> dict:
    """One chat completion, streamed or not. With cancel_after the client closes the stream
    after that many content chunks. Returns status, error kind, detail, ttft, tokens, data."""
    t0 = time.perf_counter()
    try:
        async with session.post(base_url + "/v1/chat/completions", data=dumps(body),
                                headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                return {"status": "error", "error": f"HTTP {resp.status}", "detail": (await resp.text())[:200]}
            if not body.get("stream"):
                data = await resp.json()
                return {"status": "ok", "data": data, "tokens": (data.get("usage") or {}).get("completion_tokens", 0)}
            acc = StreamAccumulator(t0)
            async for chunk in resp.content.iter_any():
                acc.feed(chunk, time.perf_counter())
                if cancel_after and len(acc.content_times) >= cancel_after:
                    resp.close()
                    return {"status": "cancelled", "ttft": acc.ttft, "tokens": len(acc.content_times)}
            acc.finish(time.perf_counter())
    except (aiohttp.ClientError, OSError, ValueError) as e:
        return {"status": "error", "error": f"client: {type(e).__name__}", "detail": str(e)[:200]}
    if acc.error:
        return {"status": "error", "error": "stream error", "detail": acc.error[:200]}
    if not acc.done:
        return {"status": "error", "error": "client: stream ended without [DONE]"}
    if not acc.content_times:
        return {"status": "error", "error": "empty answer"}
    return {"status": "ok", "ttft": acc.ttft, "tokens": acc.completion_tokens}


def check_answer(kind: str, data: dict) -> str | None:
    """Why a non-streamed answer is wrong for its kind (None when it is right)."""
    choices = data.get("choices") or []
    if len(choices) != (2 if kind == "n2" else 1):
        return f"{len(choices)} choices"
    if kind == "json" and choices[0].get("finish_reason") == "stop":  # cut by max_tokens: cannot be checked
        try:
            obj = json.loads(choices[0]["message"]["content"])
        except (ValueError, KeyError, TypeError):
            return "not JSON"
        if not isinstance(obj, dict) or set(obj) != {"city", "country"}:
            return "JSON not of the schema"
    return None


class Soak:
    """The traffic, the faults and the samples of one soak run."""

    def __init__(self, args, base_url: str, grpc_target: str | None, model_id: str) -> None:
        self.args, self.base_url, self.grpc_target, self.model_id = args, base_url, grpc_target, model_id
        self.tag = prompts.new_tag()  # one tag for the run: the shared prefix stays shared all along
        self.mix = parse_mix(args.mix, grpc=bool(grpc_target))
        self.outcomes: list[Outcome] = []
        self.samples: list[dict] = []
        self.faults: list[dict] = []
        self.drop_rate = 0.0          # share of streams the clients walk away from (the "drop" fault)
        self.stop_traffic = asyncio.Event()
        self.counter = 0
        self.t0 = time.monotonic()
        self.service_pid: int | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def __aenter__(self) -> "Soak":
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.channel = grpc.aio.insecure_channel(self.grpc_target) if self.grpc_target else None
        self.stub = llama_pb2_grpc.LlamaServiceStub(self.channel) if self.channel else None
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        if self.channel:
            await self.channel.close()

    # -- one request ----------------------------------------------------------
    async def request(self, kind: str, rng: random.Random, fault: str | None = None) -> Outcome:
        """Send one request of this kind; bounded by --hang-after (past it: error "hung")."""
        t_start = self.now()
        try:
            r = await asyncio.wait_for(self._send(kind, rng), self.args.hang_after)
        except asyncio.TimeoutError:
            r = {"status": "error", "error": "hung", "detail": f"no end within {self.args.hang_after:g}s"}
        out = Outcome(kind, t_start, self.now(), r["status"], r.get("error"), r.get("detail", ""),
                      r.get("ttft"), r.get("tokens") or 0, fault)
        self.outcomes.append(out)
        return out

    async def _send(self, kind: str, rng: random.Random) -> dict:
        self.counter += 1
        i = self.counter
        if kind == "embed":
            return await self._embed([f"[{self.tag}-{i}] {q}" for q in rng.sample(prompts.RAG_QUESTIONS, 4)] * 4)
        body = {"model": self.model_id, "max_tokens": rng.randint(32, 64), "stream": True,
                "stream_options": {"include_usage": True}}
        cancel_after = None
        if kind in ("chat-stream", "chat", "n2", "cancel", "grpc"):
            body["messages"] = prompts.chat_messages(self.tag, i)
        elif kind == "shared":
            body["messages"] = prompts.shared_prefix_messages(self.tag, rng.choice(prompts.RAG_QUESTIONS))
        elif kind == "long":
            body["messages"] = prompts.long_prompt_messages(self.tag, i, prompt_tokens=1200)
        elif kind == "json":
            body["messages"] = [{"role": "user", "content": f"[{self.tag}-{i}] Name a large city and its "
                                                            "country, as JSON."}]
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "place", "schema": JSON_SCHEMA}}
        if kind == "grpc":
            request = grpc_stream.generate_request(body["messages"], max_tokens=body["max_tokens"],
                                                   ignore_eos=False)
            call = await grpc_stream.stream_async(self.stub, request, timeout=self.args.hang_after * 2)
            if call.failure:
                code = call.error.split(":")[0] if call.error else "no content"
                return {"status": "error", "error": f"gRPC {code}", "detail": call.failure[:200]}
            return {"status": "ok", "ttft": call.ttft, "tokens": call.completion_tokens}
        if kind in ("chat", "n2", "json"):
            body["stream"] = False
            del body["stream_options"]
            if kind == "n2":
                body["n"] = 2
        if kind == "cancel" or (body["stream"] and rng.random() < self.drop_rate):
            cancel_after = rng.randint(2, 5)
        r = await http_chat(self.session, self.base_url, body, cancel_after)
        if r["status"] == "ok" and "data" in r:
            wrong = check_answer(kind, r.pop("data"))
            if wrong:
                return {"status": "error", "error": "wrong answer", "detail": wrong}
        return r

    async def _embed(self, texts: list[str]) -> dict:
        """One /v1/embeddings request: a unit vector per input."""
        try:
            async with self.session.post(self.base_url + "/v1/embeddings", data=dumps({"input": texts}),
                                         headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    return {"status": "error", "error": f"HTTP {resp.status}", "detail": (await resp.text())[:200]}
                data = (await resp.json())["data"]
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as e:
            return {"status": "error", "error": f"client: {type(e).__name__}", "detail": str(e)[:200]}
        norms = [sum(x * x for x in d["embedding"]) for d in data]
        if len(data) != len(texts) or any(abs(n - 1) > 1e-3 for n in norms):
            return {"status": "error", "error": "wrong answer", "detail": f"{len(data)} vectors for {len(texts)}"}
        return {"status": "ok"}

    async def client(self, index: int) -> None:
        """One of --concurrency clients: requests back to back until the traffic stops."""
        rng = random.Random(f"{self.args.seed}-{index}")
        kinds, weights = zip(*self.mix.items())
        while not self.stop_traffic.is_set():
            await self.request(rng.choices(kinds, weights)[0], rng)

    # -- sampling ---------------------------------------------------------------
    async def stats(self) -> dict | None:
        try:
            async with self.session.get(self.base_url + "/stats", timeout=aiohttp.ClientTimeout(total=10)) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError):
            return None

    async def sample(self) -> dict:
        s = await self.stats() or {}
        workers = s.get("worker_pids") or []
        if self.service_pid is None and workers:  # a running service: the workers' parent
            self.service_pid = parent_pid(workers[0])
        procs = {}
        if self.service_pid:
            for label, pid in label_processes(self.service_pid, workers).items():
                info = servers.process_info(pid)
                if info:
                    procs[label] = info
        sample = {"t": round(self.now(), 1), "procs": procs,
                  **{k: s.get(k) for k in ("running", "waiting", "kv_used", "kv_running", "kv_total",
                                           "worker_restarts", "workers_alive", "generated_tokens")}}
        prev = self.samples[-1] if self.samples else None
        if prev and prev["generated_tokens"] is not None and sample["generated_tokens"] is not None:
            sample["tok_s"] = round((sample["generated_tokens"] - prev["generated_tokens"])
                                    / max(sample["t"] - prev["t"], 1e-3), 1)
        self.samples.append(sample)
        return sample

    async def sampler(self, done: asyncio.Event) -> None:
        while not done.is_set():
            print(sample_line(await self.sample(), self.outcomes), flush=True)
            try:
                await asyncio.wait_for(done.wait(), self.args.sample_every)
            except asyncio.TimeoutError:
                pass

    async def wait_idle(self) -> dict:
        """After the traffic: running, waiting and the running sequences' KV cells back to 0 within
        --idle-within seconds (what stays in kv_used is the prefix cache)."""
        t0 = time.monotonic()
        while True:
            s = await self.stats() or {}
            idle = s.get("running") == 0 and s.get("waiting") == 0 and s.get("kv_running") == 0
            waited = time.monotonic() - t0
            if idle or waited > self.args.idle_within:
                return {"idle": idle, "after_s": round(waited, 1),
                        **{k: s.get(k) for k in ("running", "waiting", "kv_used", "kv_running")}}
            await asyncio.sleep(0.5)

    async def answers_correctly(self) -> dict:
        """A plain greedy chat over HTTP must name Paris; a GenerateStream call must end OK."""
        body = {"model": self.model_id, "max_tokens": 32, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        try:
            r = await asyncio.wait_for(http_chat(self.session, self.base_url, body), self.args.hang_after)
        except asyncio.TimeoutError:
            r = {"status": "error", "error": "hung"}
        text = ((r.get("data") or {}).get("choices") or [{}])[0].get("message", {}).get("content", "")
        out = {"http_ok": r["status"] == "ok" and "paris" in text.lower(), "http_answer": text[:120] or r.get("error")}
        if self.stub:
            call = await grpc_stream.stream_async(
                self.stub, grpc_stream.generate_request(body["messages"], max_tokens=32, ignore_eos=False,
                                                        temperature=0.0), timeout=self.args.hang_after)
            out["grpc_ok"], out["grpc_error"] = call.failure is None, call.failure
        return out

    # -- faults -------------------------------------------------------------------
    async def chaos(self, rng: random.Random) -> None:
        """Every fault once, in a seeded order at seeded moments after the warm-up, one at a time;
        none starts in the last 20 s of the traffic or after it stopped early."""
        order = list(FAULTS)
        rng.shuffle(order)
        last_start = max(self.args.warmup, self.args.duration - 130)
        moments = sorted(rng.uniform(self.args.warmup, last_start) for _ in order)
        for name, at in zip(order, moments):
            try:
                await asyncio.wait_for(self.stop_traffic.wait(), max(0.0, at - self.now()))
            except asyncio.TimeoutError:
                pass
            if self.now() > self.args.duration - 20 or self.stop_traffic.is_set():
                self.faults.append({"fault": name, "skipped": "no time left"})
                continue
            record = {"fault": name, "t0": round(self.now(), 1)}
            print(f"[soak] t={record['t0']:.0f}s fault: {name}", flush=True)
            try:
                record.update(await getattr(self, "fault_" + name)(rng))
            except Exception as e:  # a fault that could not be injected is reported, not fatal
                record["failed"] = f"{type(e).__name__}: {e}"
            record["t1"] = round(self.now(), 1)
            print(f"[soak] t={record['t1']:.0f}s fault {name} done: "
                  f"{ {k: v for k, v in record.items() if k not in ('fault', 't0', 't1')} }", flush=True)
            self.faults.append(record)

    async def _worker(self, rng: random.Random) -> tuple[int, dict]:
        """A live worker pid (a child of the service process) and /stats before the fault."""
        s = await self.stats()
        pids = [p for p in (s or {}).get("worker_pids", []) if parent_pid(p) == self.service_pid]
        if not pids:
            raise RuntimeError("no worker process found among the service's children")
        return rng.choice(pids), s

    async def _restarted(self, before: dict, timeout: float) -> float | None:
        """Seconds until /stats counts one more worker restart and every worker is alive again."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            s = await self.stats() or {}
            if (s.get("worker_restarts", 0) > before["worker_restarts"]
                    and s.get("workers_alive") == s.get("workers")):
                return round(time.monotonic() - t0, 1)
            await asyncio.sleep(0.25)
        return None

    async def fault_kill(self, rng: random.Random) -> dict:
        pid, before = await self._worker(rng)
        os.kill(pid, signal.SIGKILL)
        return {"pid": pid, "replaced_after_s": await self._restarted(before, 120)}

    async def fault_stop(self, rng: random.Random) -> dict:
        """SIGSTOP a worker for longer than the step timeout: the watchdog must replace it."""
        pid, before = await self._worker(rng)
        os.kill(pid, signal.SIGSTOP)
        try:
            replaced = await self._restarted(before, self.args.step_timeout + 30)
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
        return {"pid": pid, "replaced_after_s": replaced, "step_timeout_s": self.args.step_timeout}

    async def fault_flood(self, rng: random.Random) -> dict:
        """More requests at once than the slots plus --max-waiting hold (half HTTP, half gRPC): the
        extra ones must get 429 / RESOURCE_EXHAUSTED at once, none may hang."""
        n = self.args.parallel + 3 * self.args.max_waiting
        kinds = ["chat-stream", "grpc"] if self.stub else ["chat-stream"]
        done = await asyncio.gather(*(self.request(kinds[k % len(kinds)], rng, fault="flood") for k in range(n)))
        return {"requests": n, "results": dict(Counter(o.error or o.status for o in done))}

    async def fault_drop(self, rng: random.Random) -> dict:
        """For 20 s, 30 % of the streams are closed by their client after a few tokens."""
        self.drop_rate = 0.3
        await asyncio.sleep(20)
        self.drop_rate = 0.0
        return {"drop_rate": 0.3, "seconds": 20}

    async def fault_slowloris(self, rng: random.Random, connections: int = 8, trickle_s: float = 20) -> dict:
        """Connections that send headers with a Content-Length, trickle the body a byte every 2 s for
        trickle_s, then stall: the server should answer or close each within --hang-after."""
        async def one() -> str:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            t0 = time.monotonic()
            writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: 4096\r\n\r\n{{".encode())
            answer = asyncio.ensure_future(reader.read(64))

            async def trickle() -> None:
                while time.monotonic() - t0 < trickle_s:
                    await asyncio.sleep(2)
                    writer.write(b" ")
                    try:
                        await writer.drain()
                    except OSError:  # the server closed it
                        return
            feeder = asyncio.ensure_future(trickle())
            try:
                got = await asyncio.wait_for(answer, self.args.hang_after)
                return ("answered " + got.split(b"\r\n")[0].decode(errors="replace")[9:12]) if got else "closed"
            except asyncio.TimeoutError:
                return "held open"
            except OSError:
                return "closed"
            finally:
                feeder.cancel()
                writer.close()
        done = await asyncio.gather(*(one() for _ in range(connections)), return_exceptions=True)
        return {"connections": connections,
                "results": dict(Counter(d if isinstance(d, str) else type(d).__name__ for d in done))}

    @property
    def host(self) -> str:
        return self.base_url.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1].split("/")[0])


def parse_mix(text: str, grpc: bool) -> dict[str, float]:
    """"kind:weight,..." -> {kind: weight}; gRPC calls only when there is a gRPC door."""
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.strip().partition(":")
        mix[kind] = float(weight or 1)
    return {k: w for k, w in mix.items() if w > 0 and (grpc or k != "grpc")}


def sample_line(s: dict, outcomes: list[Outcome]) -> str:
    mem = " ".join(f"{k}={v.get('pss_mib', 0):.0f}" for k, v in s["procs"].items())
    c = Counter(o.status for o in outcomes)
    return (f"[soak] t={s['t']:6.0f}s tok/s={s.get('tok_s') or 0:6.1f} running={s['running']} "
            f"waiting={s['waiting']} kv={s['kv_used']}/{s['kv_running']} PSS MiB: {mem}  "
            f"ok={c['ok']} cancelled={c['cancelled']} err={c['error']}")


# ---------------------------------------------------------------------------
# verdict (pure)
# ---------------------------------------------------------------------------

def process_growth(samples: list[dict], warmup: float, max_growth: float) -> dict:
    """Per process of the last sample: PSS, RSS, fds and threads from its baseline (its first sample
    at least `warmup` s after it appeared: the start for the first processes, its spawn for a
    replaced worker) to the last sample; flags PSS growth above max_growth and fd/thread growth
    above COUNT_SLACK."""
    if not samples:
        return {}
    out = {}
    for label, last in samples[-1]["procs"].items():
        life = []  # the samples of this pid, the last life under this label
        for s in samples:
            p = s["procs"].get(label)
            if p is not None:
                life = life + [(s["t"], p)] if p["pid"] == last["pid"] else []
        born = life[0][0] if life[0][0] > samples[0]["t"] else 0.0
        base = next(((t, p) for t, p in life if t >= born + warmup), None)
        if base is None or base[0] == life[-1][0]:
            out[label] = {"pid": last["pid"], "judged": False,
                          "why": f"seen from t={born:.0f}s, no sample after its warm-up but the last"}
            continue
        t, first = base
        g = {"pid": last["pid"], "judged": True, "from_t": t, "to_t": life[-1][0]}
        for key in ("pss_mib", "rss_mib", "fds", "threads"):
            g[key] = [first.get(key), last.get(key)]
        g["pss_growth"] = round(last["pss_mib"] / first["pss_mib"] - 1, 4) if first.get("pss_mib") else None
        g["flags"] = ([f"PSS +{g['pss_growth']:.1%}"] if g["pss_growth"] is not None and g["pss_growth"] > max_growth
                      else []) + [f"{k} {first[k]} -> {last[k]}" for k in ("fds", "threads")
                                  if last.get(k, 0) - first.get(k, 0) > COUNT_SLACK]
        out[label] = g
    return out


def fault_windows(faults: list[dict], grace: float = 5.0) -> list[tuple[str, float, float]]:
    return [(f["fault"], f["t0"], f["t1"] + grace) for f in faults if "t0" in f]


def errors_by_fault(outcomes: list[Outcome], faults: list[dict]) -> dict:
    """Failed requests by error kind, per fault: sent by it (the flood), or failed during its window
    (plus a few seconds' grace; the latest fault when windows overlap); the rest under "none",
    which should stay empty."""
    windows = sorted(fault_windows(faults), key=lambda w: -w[1])
    out: dict[str, Counter] = {}
    for o in outcomes:
        if o.status != "error":
            continue
        cause = o.fault or next((name for name, t0, t1 in windows if t0 <= o.t_end <= t1), "none")
        out.setdefault(cause, Counter())[o.error] += 1
    return {k: dict(v) for k, v in out.items()}


def verdict(samples: list[dict], outcomes: list[Outcome], faults: list[dict], end: dict, *,
            warmup: float, max_growth: float, chaos: bool) -> dict:
    """Every figure of the run and the checks it passes or fails. `end` holds what was checked after
    the traffic: idle (KV back to idle), answer (a plain chat), stop (exit code, leftovers), restarts."""
    growth = process_growth(samples, warmup, max_growth)
    by_fault = errors_by_fault(outcomes, faults)
    steady = [o for o in outcomes if o.fault is None]
    windows = fault_windows(faults)
    quiet = [o for o in steady if not any(t0 <= o.t_end and o.t_start <= t1 for _, t0, t1 in windows)]
    rates = [s["tok_s"] for s in samples if s.get("tok_s") is not None]
    v = {"requests": len(steady), "completed": sum(o.status == "ok" for o in steady),
         "cancelled_by_client": sum(o.status == "cancelled" for o in steady),
         "completed_by_kind": dict(Counter(o.kind for o in steady if o.status == "ok")),
         "errors": dict(Counter(o.error for o in outcomes if o.status == "error")),
         "errors_by_fault": by_fault, "hung": sum(o.error == "hung" for o in outcomes),
         "ttft_ms": spread([o.ttft * 1000 for o in steady if o.ttft is not None and o.status != "error"]),
         "latency_s": spread([o.t_end - o.t_start for o in steady if o.status == "ok"]),
         "latency_s_outside_faults": spread([o.t_end - o.t_start for o in quiet if o.status == "ok"]),
         "tokens_per_s": {"mean": sum(rates) / len(rates) if rates else None, "max": max(rates, default=None)},
         "processes": growth, **end}
    if chaos:
        v["faults"] = faults
    checks = [("memory", not any(g.get("flags") for g in growth.values()),
               "; ".join(f"{k}: {', '.join(g['flags'])}" for k, g in growth.items() if g.get("flags")) or
               f"no process grew more than {max_growth:.0%} (PSS) or {COUNT_SLACK} fds/threads after the warm-up"),
              ("no hung request", v["hung"] == 0, f"{v['hung']} hung"),
              ("no error outside the faults", not by_fault.get("none"), str(by_fault.get("none") or {})),
              ("KV back to idle", bool(end.get("idle", {}).get("idle")), str(end.get("idle")))]
    if "answer" in end:
        a = end["answer"]
        checks.append(("answers at the end", a.get("http_ok") and a.get("grpc_ok", True), str(a)))
    if "stop" in end:
        s = end["stop"]
        checks.append(("clean stop", s["exit_code"] == 0 and not s["leftover_pids"] and not s["leftover_shm"],
                       f"exit {s['exit_code']}, leftover processes {s['leftover_pids']}, "
                       f"/dev/shm {s['leftover_shm']}"))
    if chaos:
        for f in faults:
            checks.append((f"fault {f['fault']}", *fault_check(f)))
    v["checks"] = [{"check": name, "ok": bool(ok), "detail": detail} for name, ok, detail in checks]
    v["pass"] = all(c["ok"] for c in v["checks"])
    return v


def spread(values: list[float]) -> dict:
    """p50, p90, p95 and max of a list of figures, and how many there were."""
    return {**{f"p{p}": percentile(values, p) for p in (50, 90, 95)}, "max": max(values, default=None),
            "n": len(values)}


def fault_check(f: dict) -> tuple[bool, str]:
    """Whether the service coped with one fault as the README says it does."""
    if "skipped" in f or "failed" in f:
        return False, f.get("skipped") or f["failed"]
    name = f["fault"]
    if name in ("kill", "stop"):
        return f["replaced_after_s"] is not None, f"worker {f['pid']} replaced after {f['replaced_after_s']} s"
    if name == "flood":
        r = f["results"]
        rejected = r.get("HTTP 429", 0) + r.get("gRPC RESOURCE_EXHAUSTED", 0)
        others = {k: n for k, n in r.items() if k not in ("ok", "HTTP 429", "gRPC RESOURCE_EXHAUSTED")}
        return rejected > 0 and not others, f"{r}"
    if name == "slowloris":
        return not f["results"].get("held open"), f"{f['results']} (per connection, within the hang bound)"
    return True, f"drop rate {f['drop_rate']:.0%} for {f['seconds']} s"


def format_verdict(v: dict) -> str:
    lines = [f"requests {v['requests']}: completed {v['completed']}, cancelled by the client "
             f"{v['cancelled_by_client']}; by kind {v['completed_by_kind']}",
             f"TTFT ms {_spread(v['ttft_ms'])}; tokens/s mean "
             f"{_num(v['tokens_per_s']['mean'])}, max {_num(v['tokens_per_s']['max'])}",
             f"end-to-end s {_spread(v['latency_s'], 1)}; outside the fault windows "
             f"{_spread(v['latency_s_outside_faults'], 1)}",
             f"errors by kind: {v['errors'] or 'none'}; by fault: {v['errors_by_fault'] or 'none'}; hung {v['hung']}"]
    if "worker_restarts" in v:
        lines.append(f"worker restarts seen in /stats: {v['worker_restarts']}")
    for label, g in v["processes"].items():
        if g["judged"]:
            lines.append(f"  {label:<12} pid {g['pid']:<7} t={g['from_t']:.0f}->{g['to_t']:.0f}s  PSS "
                         f"{g['pss_mib'][0]:.0f}->{g['pss_mib'][1]:.0f} MiB ({g['pss_growth']:+.1%})  RSS "
                         f"{g['rss_mib'][0]:.0f}->{g['rss_mib'][1]:.0f}  fds {g['fds'][0]}->{g['fds'][1]}  "
                         f"threads {g['threads'][0]}->{g['threads'][1]}")
        else:
            lines.append(f"  {label:<12} pid {g['pid']:<7} not judged: {g['why']}")
    for c in v["checks"]:
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['check']}: {c['detail']}")
    lines.append(f"verdict: {'PASS' if v['pass'] else 'FAIL'}")
    return "\n".join(lines)


def _num(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _spread(s: dict, digits: int = 0) -> str:
    return ", ".join(f"{k} {_num(s[k], digits)}" for k in ("p50", "p90", "p95", "max")) + f" (n={s['n']})"


# ---------------------------------------------------------------------------
# plot (pure): SVG polylines
# ---------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def svg_plot(samples: list[dict], faults: list[dict], title: str = "soak") -> str:
    """PSS per process (top) and tokens/s (bottom) over time, fault windows shaded."""
    width, left, right, panel_h, gap, top = 900, 60, 150, 200, 50, 40
    t_max = max([s["t"] for s in samples] + [1.0])
    labels = sorted({label for s in samples for label in s["procs"]})
    panels = [("PSS MiB", {label: [(s["t"], s["procs"][label]["pss_mib"]) for s in samples if label in s["procs"]]
                           for label in labels}),
              ("tokens/s", {"tokens/s": [(s["t"], s["tok_s"]) for s in samples if s.get("tok_s") is not None]})]
    plot_w = width - left - right
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{top + 2 * (panel_h + gap)}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="20" font-size="14">{escape(title)}</text>']
    for n, (name, series) in enumerate(panels):
        y0 = top + n * (panel_h + gap)
        y_max = max([v for pts in series.values() for _, v in pts] + [1.0]) * 1.1

        def x(t: float) -> float:
            return left + plot_w * t / t_max

        def y(v: float) -> float:
            return y0 + panel_h * (1 - v / y_max)
        for k, f in enumerate(faults):
            if "t0" in f:
                parts.append(f'<rect x="{x(f["t0"]):.1f}" y="{y0}" width="{max(x(f["t1"]) - x(f["t0"]), 1):.1f}" '
                             f'height="{panel_h}" fill="#f4c7c3" opacity="0.6"><title>{f["fault"]}</title></rect>')
                if n == 0:
                    parts.append(f'<text x="{x(f["t0"]):.1f}" y="{y0 - 3 - 11 * (k % 2)}" fill="#a33">'
                                 f'{f["fault"]}</text>')  # staggered: faults can follow each other closely
        parts.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" fill="none" stroke="#333"/>')
        parts.append(f'<text x="{left - 5}" y="{y0 + 10}" text-anchor="end">{y_max:.0f}</text>'
                     f'<text x="{left - 5}" y="{y0 + panel_h}" text-anchor="end">0</text>'
                     f'<text x="{left - 45}" y="{y0 + panel_h / 2}" transform="rotate(-90 {left - 45} '
                     f'{y0 + panel_h / 2})" text-anchor="middle">{name}</text>')
        for k in range(6):
            t = t_max * k / 5
            parts.append(f'<text x="{x(t):.1f}" y="{y0 + panel_h + 14}" text-anchor="middle">{t:.0f}s</text>')
        for i, (label, pts) in enumerate(series.items()):
            color = COLORS[i % len(COLORS)]
            if pts:
                points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}">'
                             f'<title>{escape(label)}</title></polyline>')
            parts.append(f'<text x="{width - right + 10}" y="{y0 + 14 * (i + 1)}" fill="{color}">'
                         f'{escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Soak test of the service, optionally with faults injected.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("service (started here unless --base-url)")
    g.add_argument("--base-url", help="a running service, e.g. http://127.0.0.1:16070")
    g.add_argument("--grpc-target", metavar="HOST:PORT", help="with --base-url: its gRPC door (else no gRPC calls)")
    g.add_argument("--service-cmd", default=servers.DEFAULT_SERVICE_CMD,
                   help="how the service is started (placeholders as bench_serving's); --chaos adds "
                        "--step-timeout and --max-waiting")
    g.add_argument("--model", help="GGUF file (default: the service's default model)")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--parallel", type=int, default=16)
    g.add_argument("--ctx-size", type=int, default=0, help="KV cells (0 = the service's default)")
    g.add_argument("--ready-timeout", type=float, default=180.0)
    g.add_argument("--log-dir", default=str(servers.LOADTEST / "results" / "logs"))
    w = p.add_argument_group("traffic")
    w.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    w.add_argument("--concurrency", type=int, default=8, help="clients sending back to back")
    w.add_argument("--mix", default=DEFAULT_MIX,
                   help="kinds and weights: chat-stream, chat (not streamed), shared (shared system prompt + RAG "
                        "context), long (~1,200-token prompt), n2, json (json_schema), cancel (closed after a "
                        "few tokens), grpc (GenerateStream), embed (/v1/embeddings, 16 inputs)")
    w.add_argument("--seed", type=int, default=1, help="seeds the mix and the faults")
    w.add_argument("--hang-after", type=float, default=60.0,
                   help="a request without an answer or an error after this many seconds is hung")
    c = p.add_argument_group("faults")
    c.add_argument("--chaos", action="store_true", help="inject " + ", ".join(FAULTS) + " at seeded moments")
    c.add_argument("--step-timeout", type=float, default=5.0, help="the service's --step-timeout under --chaos")
    c.add_argument("--max-waiting", type=int, default=16, help="the service's --max-waiting under --chaos")
    o = p.add_argument_group("measurement and output")
    o.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    o.add_argument("--warmup", type=float, default=60.0, help="memory growth is counted from this many seconds in")
    o.add_argument("--max-growth", type=float, default=0.05, help="PSS growth per process flagged above this")
    o.add_argument("--idle-within", type=float, default=10.0, help="seconds the KV cache gets to go back to idle")
    o.add_argument("--json", metavar="PATH", help="write the verdict and every sample")
    o.add_argument("--plot", default=str(servers.LOADTEST / "results" / "soak.svg"), help="SVG written here")
    a = p.parse_args(argv)
    if a.grpc_target and not a.base_url:
        p.error("--grpc-target goes with --base-url (a started service gets its own port)")
    return a


async def soak(args, base_url: str, grpc_target: str | None, model_id: str, service_pid: int | None) -> tuple:
    loop = asyncio.get_running_loop()
    async with Soak(args, base_url, grpc_target, model_id) as s:
        s.service_pid = service_pid
        for sig in (signal.SIGINT, signal.SIGTERM):  # end the traffic early, still judge what ran
            loop.add_signal_handler(sig, s.stop_traffic.set)
        sampled = asyncio.Event()
        first = await s.stats() or {}
        sampler = asyncio.create_task(s.sampler(sampled))
        clients = [asyncio.create_task(s.client(i)) for i in range(args.concurrency)]
        chaos = asyncio.create_task(s.chaos(random.Random(args.seed))) if args.chaos else None
        try:
            await asyncio.wait_for(s.stop_traffic.wait(), args.duration)
        except asyncio.TimeoutError:
            s.stop_traffic.set()
        print(f"[soak] t={s.now():.0f}s traffic stops; waiting for the requests in flight", flush=True)
        await asyncio.gather(*clients, *([chaos] if chaos else []))  # each request ends within --hang-after
        end = {"idle": await s.wait_idle()}
        sampled.set()
        await sampler
        await s.sample()  # the last sample: idle, after the traffic
        end["answer"] = await s.answers_correctly()
        last = await s.stats() or {}
        if "worker_restarts" in first and "worker_restarts" in last:
            end["worker_restarts"] = last["worker_restarts"] - first["worker_restarts"]
        return s.samples, s.outcomes, s.faults, end, s.service_pid


def stop_service(srv: servers.ManagedServer, pids: list[int]) -> dict:
    """SIGTERM and wait (ManagedServer.stop: SIGKILL after 15 s); then what is left of its tree
    (given a few seconds to exit after the parent) and of its /dev/shm step buffers."""
    t0 = time.monotonic()
    srv.stop()
    stopped_s = round(time.monotonic() - t0, 1)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"exit_code": srv.proc.returncode, "stopped_after_s": stopped_s,
            "leftover_pids": [p for p in pids if alive(p)],
            "leftover_shm": sorted(str(p) for p in Path("/dev/shm").glob(f"sentiric-{srv.proc.pid}-*"))}


def main(argv=None) -> int:
    args = parse_args(argv)
    srv = None
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": report.machine_info(),
            "loadavg_start": report.loadavg(), "command": "python loadtest/soak.py " + shlex.join(sys.argv[1:]),
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "log_dir")}}
    try:
        if args.base_url:
            base_url, grpc_target, pid = args.base_url.rstrip("/"), args.grpc_target, None
        else:
            port, grpc_port = servers.free_ports(2)
            argv_ = servers.service_command(args.service_cmd, port=port, grpc_port=grpc_port,
                                            model=servers.resolve_model(args.model), threads=args.threads,
                                            parallel=args.parallel, ctx_size=args.ctx_size)
            if args.ctx_size:
                argv_ += ["--ctx-size", str(args.ctx_size)]
            if args.chaos:
                argv_ += ["--step-timeout", f"{args.step_timeout:g}", "--max-waiting", str(args.max_waiting)]
            meta["service_command"] = shlex.join(argv_)
            srv = servers.ManagedServer("soak-service", argv_, port, Path(args.log_dir))
            srv.wait_ready(args.ready_timeout)
            base_url, grpc_target, pid = srv.base_url, f"127.0.0.1:{grpc_port}", srv.proc.pid
        samples, outcomes, faults, end, pid = asyncio.run(
            soak(args, base_url, grpc_target, first_model_id(base_url), pid))
        if srv:
            end["stop"] = stop_service(srv, servers.tree_pids(pid))
            srv = None
    finally:
        if srv:
            srv.stop()
    meta["loadavg_end"] = report.loadavg()
    v = verdict(samples, outcomes, faults, end, warmup=args.warmup, max_growth=args.max_growth, chaos=args.chaos)
    print()
    print(format_verdict(v))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    Path(args.plot).write_text(svg_plot(samples, faults, f"soak {meta['date']}{' --chaos' if args.chaos else ''}"))
    print(f"[soak] plot: {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(dumps({"meta": meta, "verdict": v, "samples": samples,
                                           "error_samples": error_samples(outcomes)}))
        print(f"[soak] wrote {args.json}")
    return 0 if v["pass"] else 1


def error_samples(outcomes: list[Outcome], per_kind: int = 3) -> dict:
    """The first few failed requests of each error kind, with what the server said."""
    out: dict[str, list] = {}
    for o in outcomes:
        if o.status == "error" and len(out.setdefault(o.error, [])) < per_kind:
            out[o.error].append(asdict(o))
    return out


if __name__ == "__main__":
    sys.exit(main())
