"""The Open Inference Protocol over gRPC (contract section 10): a grpc.aio
server on the application's own event loop, started and stopped by its
lifespan, beside the standard health service and server reflection.

Each call reads one way: authorize -> resolve the model -> reserve the
message in the memory budget -> ``oip_grpc.parse_infer`` -> ``oip.loss_call``
-> ``Runtime.evaluate`` (the same places, slots and budget as HTTP) ->
``oip_grpc.encode_response``. Errors are the service's own, mapped to status
codes; every call is counted and logged as an HTTP request is, in batches
after its response has gone (``middleware.Records``).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service import __version__
from service.api.middleware import Records
from service.api.ops import is_ready
from service.api.runtime import Admit, Runtime
from service.compute import Prepared, Timings, prepare
from service.config import Settings
from service.errors import ServiceError, Unauthorized
from service.logs import AccessLog
from service.losses import LossSpec
from service.protocols import oip, oip_extensions, oip_grpc
from service.tensors import ElementBudget

log = logging.getLogger("service.errors")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ["parameters", *oip_extensions.EXTENSIONS]


def extensions(runtime: Runtime) -> list[str]:
    """The protocol extensions served: shared memory where it works here."""
    return [*EXTENSIONS, *runtime.regions.extensions()]


# What answers without an API key, as /v2/health/ does over HTTP.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})

STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

Message = TypeVar("Message")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Any, Context, dict[str, Any]], Awaitable[Message]]


def _metadata(context: Context, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def rpc(handler: Handler[Message]) -> Callable[..., Awaitable[Message]]:
    """A servicer method with the service's bookkeeping: the API key, the
    status code of a ``ServiceError``, the request's memory given back, one
    metrics record and one log line (``InferenceServicer.finished``)."""
    method = handler.__name__

    @wraps(handler)
    async def call(self: InferenceServicer, request: Any, context: Context) -> Message:
        start = time.perf_counter()
        scope: dict[str, Any] = {"state": {}}
        status = 500
        stats = self.runtime.metrics.requests
        stats.in_flight += 1
        try:
            if method not in OPEN_METHODS:
                self.authorize(context)
            response = await handler(self, request, context, scope)
            status = 200
            return response
        except ServiceError as exc:
            status = exc.status
            retry = exc.headers.get("Retry-After")
            await context.abort(
                STATUS_CODES.get(status, grpc.StatusCode.INTERNAL),
                exc.detail,
                trailing_metadata=(("retry-after", retry),) if retry else (),
            )
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in gRPC %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; it has been logged")
        finally:
            stats.in_flight -= 1
            self.runtime.request_ended(scope)
            self.finished(method, context, scope, status, time.perf_counter() - start)
        raise AssertionError("context.abort raises")  # pragma: no cover

    return call


# tritonclient ships no type information: its servicer base is Any to mypy
class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """inference.GRPCInferenceService: KServe's v2 methods; any other method of
    Triton's superset answers UNIMPLEMENTED."""

    def __init__(self, app: FastAPI, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.settings = runtime.settings
        self.keys = [k.get_secret_value().encode() for k in self.settings.api_keys]
        # finished calls not yet counted and logged: (method, scope, status,
        # duration, time.time(), x-request-id)
        self.records = Records(runtime, self._record)

    def authorize(self, context: Context) -> None:
        if not self.keys:
            return
        candidate = _metadata(context, "x-api-key")
        if candidate is None:
            scheme, _, token = (_metadata(context, "authorization") or "").partition(" ")
            candidate = token.strip() if scheme.lower() == "bearer" else ""
        given = candidate.encode("latin-1", "replace")
        # compare with every key, in constant time per key
        if not any([hmac.compare_digest(given, key) for key in self.keys]):
            raise Unauthorized(
                "a valid API key is required: metadata authorization: Bearer <key> or x-api-key"
            )

    def finished(
        self,
        method: str,
        context: Context,
        scope: dict[str, Any],
        status: int,
        duration: float,
    ) -> None:
        """Leave a finished call to be counted and logged within
        ``RECORD_DELAY`` seconds (sooner when ``/metrics`` is scraped or the
        app shuts down), as the HTTP requests are: recorded one by one, cold,
        that bookkeeping cost a small call a tenth of its time, and it came
        before the response went out."""
        request_id = None
        if self.runtime.access_log is not None:
            request_id = _metadata(context, "x-request-id")
        self.records.add(method, scope, status, duration, time.time(), request_id)

    def _record(
        self,
        access_log: AccessLog | None,
        method: str,
        scope: dict[str, Any],
        status: int,
        duration: float,
        now: float,
        request_id: str | None,
    ) -> bytes | None:
        """What an HTTP request leaves in the metrics and the log, with the
        gRPC method's path as its route."""
        route = f"/{SERVICE}/{method}"
        loss = scope.get("loss", "")
        stats = self.runtime.metrics.requests
        stats.record("GRPC", route, loss, status, duration)
        timings: Timings | None = scope.get("timings")
        if method == "ModelInfer" and loss:
            self.runtime.metrics.models.record(loss, status, duration, timings, now)
        bytes_in, bytes_out = scope.get("bytes_in", 0), scope.get("bytes_out", 0)
        stats.body_in += bytes_in
        stats.body_out += bytes_out
        if timings is not None:
            stats.tensor_in += timings.tensor_bytes_in
            stats.tensor_out += timings.tensor_bytes_out
        if access_log is None:
            return None
        request_id = request_id or os.urandom(16).hex()
        return access_log.line({
            "request_id": request_id[:200], "method": "GRPC", "route": route,
            "loss": loss or None, "status": status, "duration_ms": round(duration * 1000, 3),
            "bytes_in": bytes_in, "bytes_out": bytes_out,
            "device": timings.device if timings is not None else None,
        }, now)  # fmt: skip

    # ------------------------------------------------------------- health and metadata

    @rpc
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=is_ready(self.app))

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ModelReadyResponse:
        _model(request.name, request.version, scope)
        return pb.ModelReadyResponse(ready=is_ready(self.app))

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=oip.SERVER_NAME, version=__version__, extensions=extensions(self.runtime)
        )

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ModelMetadataResponse:
        spec = _model(request.name, request.version, scope)
        return oip_grpc.model_metadata(oip.model_metadata(spec))

    # ------------------------------------------------------------- extensions
    # statistics, model repository and configuration: the dicts the REST
    # routes send (oip_extensions), parsed into Triton's messages

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ModelStatisticsResponse:
        spec = _model(request.name, request.version, scope) if request.name else None
        self.runtime.flush()  # the requests finished so far, not yet recorded
        statistics = oip_extensions.statistics(self.runtime.metrics.models, spec)
        return json_format.ParseDict(statistics, pb.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any, scope: dict[str, Any]
    ) -> pb.RepositoryIndexResponse:
        models = oip_extensions.repository_index(request.ready)
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any, scope: dict[str, Any]
    ) -> pb.RepositoryModelLoadResponse:
        _model(request.model_name, "", scope)
        oip_extensions.check_load_parameters(dict(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any, scope: dict[str, Any]
    ) -> pb.RepositoryModelUnloadResponse:
        _model(request.model_name, "", scope)
        return pb.RepositoryModelUnloadResponse()

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ModelConfigResponse:
        config = oip_extensions.model_config(_model(request.name, request.version, scope))
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig()))

    # ------------------------------------------------------------- inference

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any, scope: dict[str, Any]
    ) -> pb.ModelInferResponse:
        spec = _model(request.model_name, request.model_version, scope)
        rt, settings = self.runtime, self.settings
        size = request.ByteSize()
        scope["bytes_in"] = size
        await self.hold_message(scope, size)
        timings = Timings()

        def prepare_call(admit: Admit) -> Prepared[pb.ModelInferResponse]:
            start = time.perf_counter()
            infer = oip_grpc.parse_infer(
                spec, request, ElementBudget.for_request(settings), rt.regions
            )
            call = oip.loss_call(infer, encoding="raw")
            timings.decode += time.perf_counter() - start
            return prepare(call, settings, timings, partial(oip_grpc.encode_response, infer))

        response = await rt.evaluate(scope, prepare_call, wire_bytes=size)
        scope["timings"] = timings  # read when the call is recorded, after the response
        scope["bytes_out"] = response.ByteSize()
        # trailing: sent with the status, where initial metadata costs a write of its own
        context.set_trailing_metadata((("server-timing", timings.header().decode()),))
        return response

    # ------------------------------------------------------------- shared memory (section 11)

    def _region_status(self, kind: str, name: str, response: Any) -> Any:
        """``response`` (a System- or CudaSharedMemoryStatusResponse) filled
        with the registered regions of ``kind`` (all, or the one named)."""
        for region in self.runtime.regions.status(kind, name or None):
            response.regions[region["name"]].CopyFrom(type(response).RegionStatus(**region))
        return response

    @rpc
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any, scope: dict[str, Any]
    ) -> pb.SystemSharedMemoryStatusResponse:
        return self._region_status("system", request.name, pb.SystemSharedMemoryStatusResponse())

    @rpc
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any, scope: dict[str, Any]
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.runtime.regions.register_system(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any, scope: dict[str, Any]
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.runtime.regions.unregister("system", request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any, scope: dict[str, Any]
    ) -> pb.CudaSharedMemoryStatusResponse:
        return self._region_status("cuda", request.name, pb.CudaSharedMemoryStatusResponse())

    @rpc
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any, scope: dict[str, Any]
    ) -> pb.CudaSharedMemoryRegisterResponse:
        self.runtime.regions.register_cuda(
            request.name, bytes(request.raw_handle), request.device_id, request.byte_size
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any, scope: dict[str, Any]
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.runtime.regions.unregister("cuda", request.name or None)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def hold_message(self, scope: dict[str, Any], size: int) -> None:
        """The received message counts against the request-body budget, as an
        HTTP body does (gRPC has already read it whole)."""
        rt = self.runtime
        held = rt.reservation(scope, "body_memory")
        if not rt.bodies.try_reserve(size):
            deadline = time.monotonic() + self.settings.queue_timeout
            await rt.bodies.reserve(size, deadline, "the request message", holding=held.held)
        held.add(size)


def _model(name: str, version: str, scope: dict[str, Any]) -> LossSpec:
    """The model a call names, and its loss as the call's metrics label."""
    spec = oip.model(name, version)
    scope["loss"] = spec.name
    return spec


async def _unimplemented(self: Any, request: Any, context: Context) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not supported by loss-service")


for _name in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
    if _name not in InferenceServicer.__dict__:
        setattr(InferenceServicer, _name, _unimplemented)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls and let those in flight finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_grpc(app: FastAPI, runtime: Runtime, settings: Settings) -> GrpcServer | None:
    """The gRPC server on ``LOSS_SERVICE_GRPC_PORT`` (0: none), on this event loop."""
    if not settings.grpc_port:
        return None
    server = grpc.aio.server(
        options=[
            # the message limit is the HTTP body limit
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app, runtime), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    host = settings.host
    address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
    port = server.add_insecure_port(address)
    await server.start()
    return GrpcServer(server, health_servicer, port)
