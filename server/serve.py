"""`sentiric-llama serve`: build the service from the flags, listen on both
doors at once (health says loading while the model loads), serve until a
signal, then stop: SIGTERM drains first (server/drain.py), SIGINT stops at
once; either way what still runs ends with an error."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from engine.logs import event, setup_logging
from server.admission import Admission
from server.assembly import Service, assemble
from server.banner import announce
from server.drain import Drain
from server.flags import build_parser
from server.grpc_service import GrpcDoor, LlamaService, listen_hosts
from server.metrics import Metrics
from server.web.app import create_app, create_metrics_app

log = logging.getLogger("sentiric.server")


def serve(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        service = assemble(args)
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("%s", exc, extra=event("STARTUP_FAILED"))
        return 2
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(run(service))


async def run(service: Service) -> int:
    models, settings, drain = service.models, service.settings, service.drain
    metrics = Metrics(lambda: models.current.engine, lambda: models.current.embedder, models.sleep)
    admission = Admission(models, drain, metrics, service.tenants, require_tenant=settings.require_tenant)
    runners = [web.AppRunner(create_app(admission, settings), access_log=None, handle_signals=False,
                             handler_cancellation=True)]
    sites = [(runners[0], service.port)]
    if service.metrics_port:
        runners.append(web.AppRunner(create_metrics_app(metrics), access_log=None, handle_signals=False))
        sites.append((runners[1], service.metrics_port))
    grpc_door = None
    stop, at_once = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: (at_once.set(), stop.set()))
    loop.add_signal_handler(signal.SIGHUP, lambda: service.tenants.reload(models.engines()))
    try:
        for runner, at in sites:
            await runner.setup()
            try:
                hosts = listen_hosts(service.host)
                await web.TCPSite(runner, hosts if len(hosts) > 1 else hosts[0], at).start()
            except OSError as exc:
                raise OSError(f"cannot listen on {service.host}:{at}: {exc.strerror or exc}") from None
        if service.grpc is not None:
            grpc_door = GrpcDoor(LlamaService(admission), service.grpc)
            await grpc_door.start()
    except (OSError, ValueError) as exc:
        log.error("%s", exc, extra=event("STARTUP_FAILED"))
        for runner in runners:
            await runner.cleanup()
        return 2
    grpc_port = service.grpc.port if grpc_door else 0
    log.info("listening on http://%s:%d%s, loading %s", service.host, service.port,
             f" and grpc {service.host}:{grpc_port}" if grpc_door else "", models.current.engine.config.model_path,
             extra=event("SERVICE_STARTING", http_port=service.port, grpc_port=grpc_port))
    starting = asyncio.create_task(models.current.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if starting.done() and starting.exception() is not None:
        log.error("the model could not be loaded: %s", starting.exception(), extra=event("MODEL_LOAD_FAILED"))
        code = 1
    elif starting.done():
        if grpc_door:
            await grpc_door.set_serving(True)
        models.sleep.start()
        announce(service)
        await stopping
        if not at_once.is_set():
            await _drain(drain, grpc_door, at_once)
    log.info("shutting down", extra=event("SERVICE_STOPPING"))
    drain.draining = True
    stopping.cancel()
    if not starting.done():  # the load runs in a thread: let it finish, then stop the workers cleanly
        await asyncio.wait([starting])
    await models.shutdown()  # what still runs gets its error now, and the doors send it before they close
    await drain.wait(5)
    if grpc_door:
        await grpc_door.stop(grace=1)
    for runner in runners:
        await runner.cleanup()
    return code


async def _drain(drain: Drain, grpc_door: GrpcDoor | None, cut_short: asyncio.Event) -> None:
    """Refuse new generation requests and report unready on both doors; let the running ones finish."""
    drain.draining = True
    if grpc_door:
        await grpc_door.set_serving(False)
    log.info("SIGTERM: draining; %d requests running, new ones refused; waiting up to %g s", drain.active,
             drain.timeout, extra=event("SERVICE_DRAINING", running=drain.active, timeout_s=drain.timeout))
    left = await drain.wait(drain.timeout, cut_short)
    if left:
        why = "SIGINT cut the drain short" if cut_short.is_set() else f"the drain timeout of {drain.timeout:g} s passed"
        log.warning("%s with %d requests still running; they end with an error", why, left,
                    extra=event("DRAIN_TIMEOUT", running=left, timeout_s=drain.timeout))
    else:
        log.info("drained: no request is running", extra=event("SERVICE_DRAINED"))
