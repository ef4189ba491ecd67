"""The application: ``create_app()``, and ``app`` for ``uvicorn service.main:app``."""

from __future__ import annotations

import gc
import inspect
import signal
import sys
import threading
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from service import __version__
from service.api import ops, problems, shared_memory, v1, v2, v2_extensions
from service.api.direct import DirectServer
from service.api.grpc_server import start_grpc
from service.api.hotpaths import HotPathDispatch, TrailingSlash
from service.api.middleware import APIKeyMiddleware, HttpRecords, ObservabilityMiddleware
from service.api.runtime import Runtime
from service.compute import available_devices
from service.config import Settings, SettingsError, check_device, torch_threads
from service.config import settings as default_settings
from service.limits import keep_freed_memory
from service.losses import LOSSES
from service.losses.info import example_response
from service.schemas import request_model

DESCRIPTION = """
Evaluate any `torch.nn.functional` loss over HTTP: post tensors and options
under their torch names, get the loss value and, on request, its gradients.
Results equal the in-process torch call. Names, defaults and options are
torch's; `torch.nn` class names (`CrossEntropyLoss`) work as aliases of the
function names (`cross_entropy`) at `POST /v1/losses/{name}`.
"""

# torch warns about its own documented behaviour (kl_div's "mean", broadcasting
# targets); the service returns exactly what torch computes and the warning
# would only fill the log once per request.
warnings.filterwarnings("ignore", message="reduction: 'mean' divides the total loss")
warnings.filterwarnings("ignore", message="Using a target size")


# The service has its own Prometheus metrics and request log; FastAPI's native
# OpenTelemetry hooks (FastAPI >= 0.16x) would only add per-request work.
NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


GIL_SWITCH_INTERVAL = 0.001


def warm_up() -> None:
    """Build every loss's request model and run its worked example once, at
    start-up: done lazily, the first request of each loss spent up to a few
    hundred milliseconds building them while holding the GIL, and /healthz
    waited as long. Then set the start-up objects aside from the garbage
    collector."""
    for spec in LOSSES.values():
        request_model(spec)
        example_response(spec)
    # torch, FastAPI and pydantic leave about 200,000 objects that live as long
    # as the process; a full collection walked them all in about 90 ms,
    # holding the GIL, at moments no request chose. Frozen, the collector
    # skips them.
    gc.collect()
    gc.freeze()


def drain_on_sigterm(runtime: Runtime, delay: float) -> None:
    """Delay the uvicorn server's exit on SIGTERM by ``delay`` seconds, during
    which /readyz answers 503 and requests are still served; a second SIGTERM
    (or no delay) exits at once. Installed from the lifespan, so every
    uvicorn process that runs the app drains: ``loss-service serve``, each
    of its workers (LOSS_SERVICE_WORKERS > 1: uvicorn's supervisor forwards
    SIGTERM to each) and ``uvicorn service.main:app``. Nothing is installed
    where the handler in place is not a uvicorn server's (a test client, a
    Ray Serve replica): their shutdown is their own."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread
    exit_now = signal.getsignal(signal.SIGTERM)
    server = getattr(exit_now, "__self__", None)
    if not callable(exit_now) or not isinstance(server, uvicorn.Server):
        return

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if runtime.draining or not delay:
            runtime.draining = True
            exit_now(sig, frame)
            return
        runtime.draining = True
        threading.Timer(delay, exit_now, (sig, frame)).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def create_app(settings: Settings | None = None, *, fast_dispatch: bool = True) -> FastAPI:
    """The application (``fast_dispatch=False``: the compute routes served by
    FastAPI's router instead of the hot-path dispatch, for the test that
    compares them)."""
    settings = settings or default_settings
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads = torch_threads(settings)
        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory(runtime.malloc_keep_bytes)
        # Decoding holds the GIL in the worker threads; with the default 5 ms
        # switch interval the event loop waited up to 5 ms for it at each of
        # its steps, and /healthz took several of those under load.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        app.state.devices = available_devices()  # probes CUDA once, at start-up
        warm_up()
        grpc_server = await start_grpc(app, runtime, settings)
        drain_on_sigterm(runtime, settings.shutdown_drain_seconds)
        yield
        if grpc_server is not None:
            await grpc_server.stop(settings.compute_timeout)
        runtime.regions.close()  # every region unregistered: mappings and IPC handles go
        runtime.flush()  # the last requests' metrics and log lines

    app = FastAPIOffline(
        title="loss-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # operation ids are the routes' names (cross_entropy, model_infer,
        # healthz): stable and readable for generated clients
        generate_unique_id_function=lambda route: route.name,
        # TrailingSlash drops the slash instead of a redirect
        redirect_slashes=False,
        **NO_NATIVE_TELEMETRY,
    )
    app.state.runtime = runtime
    app.state.devices = []
    records = HttpRecords(runtime)
    # small compute requests answered by the connection layer (service.api.direct)
    app.state.direct = DirectServer(runtime, records, settings) if fast_dispatch else None
    problems.install(app)
    app.include_router(v1.build_router())
    app.include_router(v2_extensions.build_router())  # before v2's /models/{name}
    app.include_router(v2.build_router())
    app.include_router(shared_memory.build_router())
    app.include_router(ops.build_router())
    v1.register_models(app)

    # FastAPI wraps user middleware in its own error, telemetry and body-limit
    # layers; the service's layers go outside them instead, so the compute
    # routes skip three layers on every request while every other route still
    # passes through all of FastAPI's (the dispatch turns any exception of a
    # compute route into a response itself).
    fastapi_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: service_middleware(  # type: ignore[method-assign]
        fastapi_stack(), settings, records, fast_dispatch
    )
    return app


def service_middleware(
    inner: ASGIApp, settings: Settings, records: HttpRecords, fast_dispatch: bool = True
) -> ASGIApp:
    """The service's middleware around FastAPI's stack, innermost first: the
    compute routes' dispatch, after a trailing slash is dropped; keys are
    checked inside CORS (so preflights pass) and inside observability (so
    401s are counted and logged)."""
    app: ASGIApp = TrailingSlash(HotPathDispatch(inner) if fast_dispatch else inner)
    if settings.api_keys:
        app = APIKeyMiddleware(
            app,
            keys=[k.get_secret_value() for k in settings.api_keys],
            metrics_open=not settings.metrics_requires_key,
        )
    if settings.cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID",
                           "Inference-Header-Content-Length"],
            expose_headers=["X-Request-ID", "Server-Timing", "Inference-Header-Content-Length"],
        )  # fmt: skip
    return ObservabilityMiddleware(app, records)


def default_app() -> FastAPI:
    """The app of ``uvicorn service.main:app``: a default device this machine
    does not have stops the server here, with one line and no traceback."""
    try:
        check_device(default_settings.device)
    except SettingsError as exc:
        raise SystemExit(f"loss-service: {exc}") from None
    return create_app()


app = default_app()
