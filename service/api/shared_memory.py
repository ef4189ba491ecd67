"""/v2/systemsharedmemory and /v2/cudasharedmemory: Triton's shared-memory
extensions over REST (contract section 11), on the registry of
``service.shm`` that gRPC's calls share."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from service.api.runtime import runtime
from service.api.v1 import json_response
from service.errors import BadRequest, PayloadTooLarge

# A registration is a few numbers and a key or a 64-byte handle.
MAX_REGISTER_BYTES = 64 * 1024


class SystemRegister(BaseModel):
    key: str = Field(description="the POSIX shared-memory object's name, as shm_open takes it")
    offset: int = Field(0, description="where the region starts in the object, in bytes")
    byte_size: int


class CudaRegister(BaseModel):
    raw_handle: dict[str, str] = Field(
        description='{"b64": the cudaIPC handle of cudaIpcGetMemHandle, base64}'
    )
    device_id: int
    byte_size: int


class SystemStatus(BaseModel):
    name: str
    key: str
    offset: int
    byte_size: int


class CudaStatus(BaseModel):
    name: str
    device_id: int
    byte_size: int


async def _registration(request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
    """A registration body: a JSON object with ``fields`` at most."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_REGISTER_BYTES:
            raise PayloadTooLarge(f"a registration is at most {MAX_REGISTER_BYTES} bytes")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON in the registration: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("the registration must be a JSON object")
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown[:10]}; expected {', '.join(fields)}")
    return payload


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["v2 shared memory (co-located clients)"])
    done = {"description": "Done (an empty body)"}
    errors: dict[int | str, dict[str, Any]] = {
        400: {"description": "Unknown region, bad key, offset or size, or already registered"},
        413: {"description": "The region does not fit in the memory budget"},
        503: {"description": "The memory budget is full now (Retry-After)"},
    }
    unknown = {"description": "No region of that name is registered"}

    @router.get("/systemsharedmemory/status", response_model=list[SystemStatus])
    def system_status(request: Request) -> Response:
        """The registered system shared-memory regions."""
        return json_response(runtime(request).regions.status("system"))

    @router.get(
        "/systemsharedmemory/region/{name}/status",
        response_model=list[SystemStatus],
        responses={400: unknown},
    )
    def system_region_status(request: Request, name: str) -> Response:
        """One registered system shared-memory region."""
        return json_response(runtime(request).regions.status("system", name))

    @router.post(
        "/systemsharedmemory/region/{name}/register",
        responses={200: done, **errors},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": SystemRegister.model_json_schema(),
            "example": {"key": "/input_data", "offset": 0, "byte_size": 1048576}}}}},
    )  # fmt: skip
    async def system_register(request: Request, name: str) -> Response:
        """Register a POSIX shared-memory object (key, offset, byte_size) as a region."""
        payload = await _registration(request, ("key", "offset", "byte_size"))
        regions = runtime(request).regions
        await anyio.to_thread.run_sync(
            regions.register_system,
            name,
            payload.get("key"),
            payload.get("offset", 0),
            payload.get("byte_size"),
        )
        return json_response({})

    @router.post("/systemsharedmemory/unregister", responses={200: done})
    def system_unregister_all(request: Request) -> Response:
        """Unregister every system shared-memory region."""
        runtime(request).regions.unregister("system")
        return json_response({})

    @router.post("/systemsharedmemory/region/{name}/unregister", responses={200: done, **errors})
    def system_unregister(request: Request, name: str) -> Response:
        """Unregister one system shared-memory region."""
        runtime(request).regions.unregister("system", name)
        return json_response({})

    @router.get("/cudasharedmemory/status", response_model=list[CudaStatus])
    def cuda_status(request: Request) -> Response:
        """The registered CUDA shared-memory regions."""
        return json_response(runtime(request).regions.status("cuda"))

    @router.get(
        "/cudasharedmemory/region/{name}/status",
        response_model=list[CudaStatus],
        responses={400: unknown},
    )
    def cuda_region_status(request: Request, name: str) -> Response:
        """One registered CUDA shared-memory region."""
        return json_response(runtime(request).regions.status("cuda", name))

    @router.post(
        "/cudasharedmemory/region/{name}/register",
        responses={200: done, **errors},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": CudaRegister.model_json_schema(),
            "example": {"raw_handle": {"b64": "<cudaIpcGetMemHandle, base64>"},
                        "device_id": 0, "byte_size": 1048576}}}}},
    )  # fmt: skip
    async def cuda_register(request: Request, name: str) -> Response:
        """Register a cudaIPC handle (raw_handle.b64, device_id, byte_size) as a region."""
        payload = await _registration(request, ("raw_handle", "device_id", "byte_size"))
        handle = payload.get("raw_handle")
        if not isinstance(handle, dict) or not isinstance(handle.get("b64"), str):
            raise BadRequest('raw_handle must be {"b64": "<the cudaIPC handle, base64>"}')
        regions = runtime(request).regions
        await anyio.to_thread.run_sync(
            regions.register_cuda,
            name,
            handle["b64"],
            payload.get("device_id"),
            payload.get("byte_size"),
        )
        return json_response({})

    @router.post("/cudasharedmemory/unregister", responses={200: done})
    def cuda_unregister_all(request: Request) -> Response:
        """Unregister every CUDA shared-memory region."""
        runtime(request).regions.unregister("cuda")
        return json_response({})

    @router.post("/cudasharedmemory/region/{name}/unregister", responses={200: done, **errors})
    def cuda_unregister(request: Request, name: str) -> Response:
        """Unregister one CUDA shared-memory region."""
        runtime(request).regions.unregister("cuda", name)
        return json_response({})

    return router
