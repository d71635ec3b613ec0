"""Logging for every process of the service: readable lines, or one JSON
object per line in the Sentiric platform's log schema (schema_v 1.0.0).

A request's tenant, trace and span ids live in context variables that the
doors set from their metadata; every line logged while serving it carries
them. `event(NAME, **attributes)` gives a line its stable UPPER_SNAKE event
name and structured attributes: `log.info("...", extra=event("REQUEST_FINISHED", status=200))`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import sys
from datetime import datetime, timezone

import orjson

SCHEMA_VERSION = "1.0.0"
SERVICE_NAME = "llm-llama-service"
tenant_id = contextvars.ContextVar("tenant_id", default=None)
trace_id = contextvars.ContextVar("trace_id", default=None)
span_id = contextvars.ContextVar("span_id", default=None)
profile = contextvars.ContextVar("profile", default=None)
lora_adapter = contextvars.ContextVar("lora_adapter", default=None)
_SEVERITY = {"WARNING": "WARN", "CRITICAL": "FATAL"}
_settings = {"level": logging.INFO, "fmt": "text"}  # what setup_logging chose, for the worker processes


def bind_request(tenant: str | None, trace: str | None, span: str | None) -> None:
    """The ids every log line of the current request (task) carries."""
    tenant_id.set(tenant or None)
    trace_id.set(trace or None)
    span_id.set(span or None)
    profile.set(None)
    lora_adapter.set(None)


def bind_model(profile_name: str | None, adapters: str | None) -> None:
    """The profile and LoRA adapter set the current request runs on, on every line logged after."""
    profile.set(profile_name or None)
    lora_adapter.set(adapters or None)


def event(name: str, **attributes) -> dict:
    """`extra=` for a log call: its event name and attributes."""
    return {"event": name, "attributes": attributes}


def service_version() -> str:
    try:
        from importlib.metadata import version
        return version("sentiric-llm-llama-service")
    except Exception:  # running from a source tree that was not installed
        return "0.0.0"


class _RequestContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.tenant_id, record.trace_id, record.span_id = tenant_id.get(), trace_id.get(), span_id.get()
        record.profile, record.lora_adapter = profile.get(), lora_adapter.get()
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__(f"%(asctime)s %(levelname)-7s {process}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{k}={v}" for k, v in (("tenant", record.tenant_id), ("trace", record.trace_id),
                                       ("span", record.span_id), ("profile", getattr(record, "profile", None)),
                                       ("adapter", record.lora_adapter)) if v]
        return f"{line} [{' '.join(ids)}]" if ids else line


class _PlatformJsonFormatter(logging.Formatter):
    """The platform's schema: schema_v, ts, severity, tenant_id, resource, trace_id, span_id,
    event, message, attributes."""

    def __init__(self, process: str):
        super().__init__()
        self.resource = {"service.name": SERVICE_NAME, "service.version": service_version(),
                         "service.env": os.environ.get("ENV", "development"), "host.name": socket.gethostname()}
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        attributes = {"logger": record.name, **getattr(record, "attributes", {})}
        if self.process:
            attributes["process"] = self.process.strip()
        for key in ("profile", "lora_adapter"):
            if getattr(record, key, None):
                attributes[key] = getattr(record, key)
        entry = {"schema_v": SCHEMA_VERSION, "ts": ts.replace("+00:00", "Z"),
                 "severity": _SEVERITY.get(record.levelname, record.levelname),
                 "tenant_id": getattr(record, "tenant_id", None), "resource": self.resource,
                 "trace_id": getattr(record, "trace_id", None), "span_id": getattr(record, "span_id", None),
                 "event": getattr(record, "event", "LOG"), "message": record.getMessage(),
                 "attributes": attributes}
        if record.exc_info:
            attributes["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str | int = "info", fmt: str = "text", process: str = "") -> None:
    """Text lines on stderr, or platform JSON on stdout (the platform collects stdout)."""
    _settings.update(level=level, fmt=fmt)
    json_lines = fmt == "json"
    handler = logging.StreamHandler(sys.stdout if json_lines else sys.stderr)
    handler.setFormatter(_PlatformJsonFormatter(process) if json_lines else _TextFormatter(process))
    handler.addFilter(_RequestContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


def current_settings() -> dict:
    """The level and format in force, for a worker process to log the same way."""
    return dict(_settings)
