"""Shared-memory regions (contract section 11): Triton's system and CUDA
shared-memory extensions, for clients on the same host.

A client registers a region under a name: a POSIX shared-memory object
(``key``, ``offset``, ``byte_size``) or a cudaIPC handle (``raw_handle``,
``device_id``, ``byte_size``). An inference request then names the region in
an input's or output's parameters (``shared_memory_region``,
``shared_memory_byte_size``, ``shared_memory_offset``): inputs are tensors
over the mapped bytes (no copy where the bytes are aligned for their dtype),
outputs are copied into the region once computed, and neither crosses the
socket.

Memory: a region's pages belong to the client (tmpfs or device memory it
allocated), but the service's mapping keeps them alive after the client
unlinks them, and the outputs it writes fault pages in. So a registered
system region counts against the request-body pool of the memory budget
(``Runtime.bodies``) for as long as it is registered, as a body that stays
would; one larger than that pool is refused (413), one that does not fit now
is a 503 with Retry-After. CUDA regions are device memory the client
allocated and are not counted (the budget is host memory).

A mapping outlives its registration while a request still uses it: tensors
over it hold the buffer (system) or the IPC mapping's owner (CUDA), and the
memory is unmapped or the IPC handle closed when the last of them is gone.
Keys and handles are never logged; errors name the region by its name.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import math
import mmap
import os
import re
import stat
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from service.errors import BadRequest, quote
from service.limits import MemoryBudget
from service.tensors import bytes_to_tensor

SHM_DIR = "/dev/shm"
# A POSIX shared-memory name as shm_open(3) takes it: one optional leading
# slash, then a file name in /dev/shm (no other slash; NAME_MAX bytes).
KEY_PATTERN = re.compile(r"/?([^/\x00]{1,255})")
NAME_LIMIT = 256
PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class Reference:
    """Where an input or output lies: a region's name, and bytes in it."""

    region: str
    byte_size: int
    offset: int

    def parameters(self) -> dict[str, Any]:
        """As an output's parameters in a response (which then carries no data)."""
        return {"shared_memory_region": self.region, "shared_memory_byte_size": self.byte_size,
                "shared_memory_offset": self.offset}  # fmt: skip


def reference(what: str, parameters: dict[str, Any]) -> Reference | None:
    """The shared-memory parameters of an input or output (plain values, as
    JSON or gRPC gave them), checked; None when it names no region."""
    region = parameters.get("shared_memory_region")
    if region is None:
        for key in ("shared_memory_byte_size", "shared_memory_offset"):
            if key in parameters:
                raise BadRequest(f"{what}: {key} is given without shared_memory_region")
        return None
    if not isinstance(region, str) or not region:
        raise BadRequest(
            f"{what}: shared_memory_region must be a region's name, got {quote(region)}"
        )
    byte_size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    for key, value in (("shared_memory_byte_size", byte_size), ("shared_memory_offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(
                f"{what}: {key} must be a non-negative integer, got {quote(value)}"
                if value is not None
                else f"{what}: shared_memory_region needs shared_memory_byte_size"
            )
    assert isinstance(byte_size, int) and isinstance(offset, int)
    return Reference(region, byte_size, offset)


class _CudaMemory:
    """Device memory opened from a cudaIPC handle, exposed to torch through
    ``__cuda_array_interface__``; torch's tensors over it hold this object,
    and the handle is closed when the last of them and the registry let go."""

    def __init__(self, pointer: int, byte_size: int, close: Any) -> None:
        self.__cuda_array_interface__ = {
            "shape": (byte_size,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
            "strides": None,
            "stream": None,  # the client wrote it before the request: nothing to order
        }
        weakref.finalize(self, close, pointer)


@dataclass
class SystemRegion:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    # the registered bytes (a view of the mapping: while one exists, the
    # mapping cannot be closed under a request that uses it)
    view: memoryview
    start: int  # the registered offset's place in the mapping

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset,
                "byte_size": self.byte_size}  # fmt: skip


@dataclass
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    tensor: torch.Tensor  # uint8, on cuda:<device_id>, over the client's memory

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}


Region = SystemRegion | CudaRegion


def _itemsize(dtype: torch.dtype) -> int:
    return 1 if dtype == torch.bool else torch.empty((), dtype=dtype).element_size()


class Regions:
    """The registered regions of this process, by name; thread-safe (the
    event loop registers, worker threads read)."""

    def __init__(self, budget: MemoryBudget, *, enabled: bool = True, why_not: str = "") -> None:
        self.budget = budget
        self.enabled = enabled
        self.why_not = why_not
        self.system: dict[str, SystemRegion] = {}
        self.cuda: dict[str, CudaRegion] = {}
        self._lock = threading.Lock()

    def extensions(self) -> list[str]:
        """The shared-memory extensions this server lists in its metadata."""
        if not self.enabled:
            return []
        return ["system_shared_memory", *(["cuda_shared_memory"] if cuda_available() else [])]

    # ------------------------------------------------------------- registration

    def _check_name(self, name: str) -> None:
        if not self.enabled:
            raise BadRequest(f"shared memory is not available on this server: {self.why_not}")
        if not name or len(name) > NAME_LIMIT:
            raise BadRequest(
                f"a region's name must have 1 to {NAME_LIMIT} characters, got {len(name)}"
            )
        if name in self.system or name in self.cuda:
            raise BadRequest(
                f"shared memory region {quote(name)} is already registered; unregister it first"
            )

    def register_system(self, name: str, key: Any, offset: Any, byte_size: Any) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the POSIX shared-memory
        object ``key`` (a name in /dev/shm)."""
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest(f"{field} must be a non-negative integer, got {quote(value)}")
        if byte_size == 0:
            raise BadRequest("byte_size must be at least 1")
        if not isinstance(key, str):
            raise BadRequest(f"key must be a string, got {quote(key)}")
        match = KEY_PATTERN.fullmatch(key)
        if match is None or match.group(1) in (".", ".."):
            raise BadRequest(
                f"key {quote(key)} is not a POSIX shared-memory name: expected one name in "
                f"{SHM_DIR}, with at most a leading '/' (as shm_open takes it)"
            )
        with self._lock:
            self._check_name(name)
            mapping, start = _map(name, key, match.group(1), offset, byte_size)
            try:
                if not self.budget.try_reserve(byte_size):
                    raise self.budget.refusal(byte_size, f"shared memory region {quote(name)}")
                view = memoryview(mapping)[start : start + byte_size]
            except BaseException:
                mapping.close()
                raise
            self.system[name] = SystemRegion(name, key, offset, byte_size, mapping, view, start)

    def register_cuda(self, name: str, raw_handle: Any, device_id: Any, byte_size: Any) -> None:
        """Open a cudaIPC handle (its raw bytes, or their base64 text) once."""
        for field, value in (("device_id", device_id), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest(f"{field} must be a non-negative integer, got {quote(value)}")
        if isinstance(raw_handle, str):
            try:
                raw_handle = base64.b64decode(raw_handle, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("raw_handle.b64 is not valid base64") from None
        if not isinstance(raw_handle, bytes):
            raise BadRequest("raw_handle must be the cudaIPC handle's bytes (b64 over HTTP)")
        with self._lock:
            self._check_name(name)
            if not cuda_available():
                raise BadRequest(
                    "CUDA shared memory is not available on this server (no CUDA device, or "
                    "cuda-python is not installed: pip install 'loss-service[cuda]')"
                )
            if device_id >= torch.cuda.device_count():
                raise BadRequest(
                    f"device_id {device_id} is not a CUDA device of this server; it has "
                    f"{torch.cuda.device_count()}"
                )
            tensor = _open_cuda(name, raw_handle, device_id, byte_size)
            self.cuda[name] = CudaRegion(name, device_id, byte_size, tensor)

    def unregister(self, kind: str, name: str | None = None) -> None:
        """Forget one region (or all of a kind); its mapping goes once no
        request uses it. An unknown name is a 400, as in Triton."""
        regions: dict[str, Any] = self.system if kind == "system" else self.cuda
        with self._lock:
            names = list(regions) if name is None else [name]
            if name is not None and name not in regions:
                raise BadRequest(f"{kind} shared memory region {quote(name)} is not registered")
            for each in names:
                region = regions.pop(each)
                if isinstance(region, SystemRegion):
                    try:
                        region.view.release()
                        region.mapping.close()
                    except BufferError:
                        pass  # a request's tensors still use it: unmapped when they go
                    self.budget.release(region.byte_size)

    def close(self) -> None:
        """Unregister everything (at shutdown)."""
        self.unregister("system")
        self.unregister("cuda")

    def status(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        regions: dict[str, Any] = self.system if kind == "system" else self.cuda
        with self._lock:
            if name is None:
                return [r.status() for r in regions.values()]
            if name not in regions:
                raise BadRequest(f"{kind} shared memory region {quote(name)} is not registered")
            return [regions[name].status()]

    # ------------------------------------------------------------- use

    def _locate(self, what: str, ref: Reference) -> memoryview | torch.Tensor:
        """The bytes a reference names, checked: a view of a system region's
        mapping, or a uint8 tensor over a CUDA region's memory."""
        with self._lock:  # not unregistered (and unmapped) while it is taken
            region: Region | None = self.system.get(ref.region) or self.cuda.get(ref.region)
            if region is None:
                raise BadRequest(
                    f"{what}: shared memory region {quote(ref.region)} is not registered"
                )
            end = ref.offset + ref.byte_size
            if end > region.byte_size:
                raise BadRequest(
                    f"{what}: shared_memory_offset {ref.offset} + shared_memory_byte_size "
                    f"{ref.byte_size} runs past the end of region {quote(ref.region)} "
                    f"({region.byte_size} bytes)"
                )
            if isinstance(region, CudaRegion):
                return region.tensor[ref.offset : end]
            # the client may have shrunk the object since it registered it:
            # reading past its end would be a SIGBUS
            if region.mapping.size() < region.offset + region.byte_size:
                raise BadRequest(
                    f"{what}: shared memory region {quote(ref.region)} is smaller than when "
                    "it was registered (the object was truncated); register it again"
                )
            return region.view[ref.offset : end]

    def read(self, what: str, ref: Reference, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """An input's tensor over a region's bytes: in place where they are
        aligned for ``dtype`` (a system region's, on the CPU; a CUDA
        region's, on its device), else copied once."""
        needed = math.prod(shape) * _itemsize(dtype)
        if ref.byte_size != needed:
            raise BadRequest(
                f"{what}: shared_memory_byte_size is {ref.byte_size} but shape {shape} of "
                f"{dtype_text(dtype)} takes {needed} bytes"
            )
        data = self._locate(what, ref)
        wire = torch.uint8 if dtype == torch.bool else dtype
        if isinstance(data, memoryview):
            return bytes_to_tensor(data, wire, shape, as_bool=dtype == torch.bool)
        if needed and data.data_ptr() % _itemsize(wire):
            data = data.clone()
        tensor = data.view(wire).reshape(shape)
        return tensor != 0 if dtype == torch.bool else tensor

    def target(self, what: str, ref: Reference) -> Target:
        """Where an output will be written, resolved before the computation
        (an unknown region or one too small for the bytes named is a 400
        before any work)."""
        data = self._locate(what, ref)
        if isinstance(data, memoryview):
            return Target(ref, data, None)
        return Target(ref, None, data)


@dataclass
class Target:
    """An output's place in a region, held from parsing to writing (it keeps
    the mapping alive if the region is unregistered meanwhile)."""

    ref: Reference
    host: memoryview | None
    device: torch.Tensor | None

    def write(self, what: str, tensor: torch.Tensor) -> None:
        """Copy an output into its place (one copy, device to device or
        host to host; across them where the region and the computation
        differ)."""
        flat = tensor.detach().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        size = flat.numel() * flat.element_size()
        if size > self.ref.byte_size:
            raise BadRequest(
                f"{what}: shared_memory_byte_size {self.ref.byte_size} is too small; this output "
                f"({dtype_text(tensor.dtype)}, shape {list(tensor.shape)}) takes {size} bytes"
            )
        if size == 0:
            return
        source = flat.contiguous().view(torch.uint8)
        if self.host is not None:
            destination = torch.frombuffer(self.host, dtype=torch.uint8, count=size)
        else:
            assert self.device is not None
            destination = self.device[:size]
        destination.copy_(source)
        if destination.is_cuda:
            # the client reads it once the response arrives
            torch.cuda.current_stream(destination.device).synchronize()


def dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _map(name: str, key: str, file: str, offset: int, byte_size: int) -> tuple[mmap.mmap, int]:
    """Map the object's bytes [offset, offset + byte_size): the mapping, and
    where ``offset`` lies in it."""
    path = os.path.join(SHM_DIR, file)
    try:
        # O_NOFOLLOW: a symbolic link in /dev/shm must not lead elsewhere (as shm_open)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadRequest(
            f"cannot register region {quote(name)}: no shared-memory object {quote(key)} "
            f"in {SHM_DIR}"
        ) from None
    except OSError as exc:
        raise BadRequest(
            f"cannot register region {quote(name)}: shared-memory object {quote(key)} cannot "
            f"be opened for reading and writing ({exc.strerror})"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest(
                f"cannot register region {quote(name)}: {quote(key)} is not a shared-memory object"
            )
        if offset + byte_size > info.st_size:
            raise BadRequest(
                f"cannot register region {quote(name)}: offset {offset} + byte_size {byte_size} "
                f"runs past the end of shared-memory object {quote(key)} ({info.st_size} bytes)"
            )
        start = offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(fd, start + byte_size, offset=offset - start)
        except OSError as exc:
            raise BadRequest(
                f"cannot register region {quote(name)}: mapping it failed ({exc.strerror})"
            ) from None
        return mapping, start
    finally:
        os.close(fd)  # the mapping keeps its own


# --------------------------------------------------------------------------- CUDA


def _cudart() -> Any:
    """cuda-python's runtime bindings (the optional extra ``cuda``), or None."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python before 12.6
        except ImportError:
            return None
    return runtime


def cuda_available() -> bool:
    """Whether CUDA shared memory works here: a CUDA device and cuda-python."""
    return torch.cuda.is_available() and _cudart() is not None


def _open_cuda(name: str, raw_handle: bytes, device_id: int, byte_size: int) -> torch.Tensor:
    """A uint8 tensor on ``cuda:<device_id>`` over the memory a cudaIPC handle
    names (opened once; closed when the tensor and its views are gone)."""
    cudart = _cudart()
    size = int(getattr(cudart, "CUDA_IPC_HANDLE_SIZE", 64))
    if len(raw_handle) != size:
        raise BadRequest(
            f"cannot register region {quote(name)}: raw_handle holds {len(raw_handle)} bytes, "
            f"a cudaIPC handle {size}"
        )
    handle = cudart.cudaIpcMemHandle_t()
    # cuda-python 13 exposes the handle's bytes only through its address
    ctypes.memmove(handle.getPtr(), raw_handle, size)
    with torch.cuda.device(device_id):
        # the device's primary context (torch's) current for cuda-python too
        cudart.cudaSetDevice(device_id)
        err, pointer = cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BadRequest(
            f"cannot register region {quote(name)}: cudaIpcOpenMemHandle failed ({err.name}); "
            "the handle must come from cudaIpcGetMemHandle in another process on this host"
        )

    def close(address: int) -> None:
        cudart.cudaIpcCloseMemHandle(address)

    memory = _CudaMemory(int(pointer), byte_size, close)
    return torch.as_tensor(memory, device=torch.device("cuda", device_id))
