"""Triton's system shared-memory extension: named regions of POSIX shared-memory objects.

A client creates an object with ``shm_open`` (``tritonclient.utils.shared_memory`` does), registers
``(name, key, offset, byte_size)``, then names the region in an input's or output's parameters
(``shared_memory_region``, ``shared_memory_offset``, ``shared_memory_byte_size``) instead of sending
the bytes. Inputs are read from the mapping without a copy; outputs are written into it.

Only objects under ``/dev/shm`` are opened, by key (one path component, no links), never created and
never unlinked: the client owns them. A region is mapped read-only when it is registered; it is opened
read/write only when a request first writes an output into it. Unregistering closes both mappings.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldserve.errors import AlreadyExists, InvalidInput
from server.core.types import ShmRef

logger = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")
KEY_RULE = "a shm_open name: an optional leading '/', then 1-255 of A-Z a-z 0-9 . _ - (no other '/')"
_KEY = re.compile(r"/?([A-Za-z0-9._-]{1,255})")
CUDA_SHM_UNSUPPORTED = ("CUDA shared memory is not supported by this server; use system shared memory "
                        "(SystemSharedMemoryRegister, /v2/systemsharedmemory, perf_analyzer --shared-memory system)")
NAME_RULE = "1-256 printable ASCII characters"
_NAME = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,255}")


@dataclass
class Region:
    name: str
    key: str
    offset: int                 # of the region within the shared-memory object
    byte_size: int
    path: Path
    readable: mmap.mmap
    writable: mmap.mmap | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def status(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


def check_region_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = str(name)[:64]
        raise InvalidInput(f"shared-memory region name {shown!r} is not valid: {NAME_RULE}")
    return name


def _path(key: str) -> Path:
    m = _KEY.fullmatch(key) if isinstance(key, str) else None
    if m is None or m.group(1) in (".", ".."):
        raise InvalidInput(f"shared-memory key {str(key)[:64]!r} is not valid: {KEY_RULE}")
    return SHM_ROOT / m.group(1)


def _map(path: Path, key: str, offset: int, byte_size: int, write: bool) -> mmap.mmap:
    """The object's pages covering [offset, offset + byte_size), checked against its size."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InvalidInput(f"shared-memory key {key!r}: no such object in {SHM_ROOT}") from None
    except OSError as exc:
        raise InvalidInput(f"shared-memory key {key!r}: cannot open it "
                           f"{'read/write' if write else 'read-only'} ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"shared-memory key {key!r} is not a shared-memory object")
        if offset + byte_size > st.st_size:
            raise InvalidInput(f"shared-memory key {key!r}: offset {offset} + byte_size {byte_size} runs past the end "
                               f"of the object ({st.st_size} bytes)")
        if byte_size == 0:
            raise InvalidInput(f"shared-memory key {key!r}: byte_size must be > 0")
        return mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED,
                         mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))
    finally:
        os.close(fd)


def _close(m: mmap.mmap | None) -> bool:
    """Unmap; False while a request still holds a view of it (the caller retries later)."""
    if m is None:
        return True
    try:
        m.close()
    except BufferError:
        return False
    return True


class SystemSharedMemory:
    """The registered regions of one server process (every worker holds the same set: see coordinator.py)."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._retired: list[mmap.mmap] = []     # unregistered while a request still read from them
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        check_region_name(name)
        for what, v in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 62:
                raise InvalidInput(f"shared-memory region {name!r}: {what} must be a non-negative integer, got {v!r}")
        path = _path(key)
        with self._lock:
            self.check_new(name)
            self._regions[name] = Region(name, key, offset, byte_size, path, _map(path, key, offset, byte_size, False))
        logger.info("registered shared-memory region %r (key %s, offset %d, %d bytes)", name, key, offset, byte_size)

    def unregister(self, name: str = "") -> list[str]:
        """Unregister one region, or every region for an empty name; returns the names removed. Unknown
        names are not an error (Triton's behaviour: unregistering is idempotent)."""
        with self._lock:
            names = [name] if name else list(self._regions)
            gone = [self._regions.pop(n) for n in names if n in self._regions]
            maps = self._retired + [m for r in gone for m in (r.readable, r.writable) if m is not None]
            busy = [m for m in maps if not _close(m)]
            if busy:  # views kept alive only by reference cycles (a failed request's traceback)
                import gc

                gc.collect()
                busy = [m for m in busy if not _close(m)]
            self._retired = busy
        return [r.name for r in gone]

    def status(self, name: str = "") -> list[dict[str, object]]:
        with self._lock:
            if name:
                if name not in self._regions:
                    raise InvalidInput(f"shared-memory region {name!r} is not registered")
                return [self._regions[name].status()]
            return [r.status() for r in self._regions.values()]

    def names(self) -> set[str]:
        return set(self._regions)

    def check_new(self, name: str) -> None:
        """AlreadyExists when ``name`` is registered (Triton refuses a second registration of a name)."""
        if name in self._regions:
            raise AlreadyExists(f"shared-memory region {name!r} is already registered (unregister it first)")

    def _region(self, ref: ShmRef, what: str) -> Region:
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidInput(f"{what}: shared-memory region {ref.region!r} is not registered")
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > region.byte_size:
            raise InvalidInput(f"{what}: shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size} "
                               f"runs past the end of region {ref.region!r} ({region.byte_size} bytes)")
        return region

    def read(self, ref: ShmRef, what: str) -> memoryview:
        """A read-only view of the referenced bytes (no copy)."""
        region = self._region(ref, what)
        start = region.offset + ref.offset
        return memoryview(region.readable)[start:start + ref.byte_size]

    def write(self, ref: ShmRef, data: bytes | memoryview, what: str) -> None:
        region = self._region(ref, what)
        if len(data) > ref.byte_size:
            raise InvalidInput(f"{what}: {len(data)} bytes do not fit the {ref.byte_size} bytes given by "
                               f"shared_memory_byte_size in region {ref.region!r}")
        with region.lock:
            if region.writable is None:
                region.writable = _map(region.path, region.key, region.offset, region.byte_size, True)
            start = region.offset + ref.offset
            region.writable[start:start + len(data)] = data

    def close(self) -> None:
        self.unregister()


def shm_ref(params: dict[str, Any], what: str) -> ShmRef | None:
    """The shared-memory reference in a tensor's parameters (both transports give plain Python values), or
    None when the tensor does not use shared memory."""
    region = params.get("shared_memory_region")
    if region is None:
        extra = [k for k in ("shared_memory_byte_size", "shared_memory_offset") if k in params]
        if extra:
            raise InvalidInput(f"{what}: {extra[0]} given without shared_memory_region")
        return None
    if not isinstance(region, str):
        raise InvalidInput(f"{what}: shared_memory_region must be a string")
    check_region_name(region)
    values = []
    for key, default in (("shared_memory_offset", 0), ("shared_memory_byte_size", None)):
        v = params.get(key, default)
        if v is None:
            raise InvalidInput(f"{what}: shared_memory_region {region!r} needs shared_memory_byte_size")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidInput(f"{what}: {key} must be a non-negative integer, got {v!r}")
        values.append(v)
    return ShmRef(region, values[0], values[1])
