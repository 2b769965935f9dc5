"""Triton's system shared-memory extension: named regions of POSIX shared-memory objects.

A client creates an object with ``shm_open`` (``tritonclient.utils.shared_memory`` does), registers
``(name, key, offset, byte_size)``, then names the region in an input's or output's parameters
(``shared_memory_region``, ``shared_memory_offset``, ``shared_memory_byte_size``) instead of sending
the bytes.

Only regular files under ``/dev/shm`` are opened, by key (one path component, no links, never a FIFO or a
device: checked before and after a non-blocking open, so nothing can make the event loop wait), never
created and never unlinked: the client owns them. The bytes are read with ``preadv`` into the request's
own buffer and written with ``pwrite``, never through a memory mapping: the client can truncate its object
at any time, and a mapped page past the new end would kill the process with SIGBUS; a read that comes up
short is a 400 naming the region. Regions that name one object share one descriptor, and at most
``max_regions`` regions exist at once (RESOURCE_EXHAUSTED / 429 past it).
"""
from __future__ import annotations

import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldserve.errors import AlreadyExists, InvalidInput, LimitExceeded
from server.core.types import ShmRef
from server.settings import flag

logger = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")
KEY_RULE = "a shm_open name: an optional leading '/', then 1-255 of A-Z a-z 0-9 . _ - (no other '/')"
_KEY = re.compile(r"/?([A-Za-z0-9._-]{1,255})")
CUDA_SHM_UNSUPPORTED = ("CUDA shared memory is not supported by this server; use system shared memory "
                        "(SystemSharedMemoryRegister, /v2/systemsharedmemory, perf_analyzer's system shared memory)")
NAME_RULE = "1-256 printable ASCII characters"
_NAME = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,255}")
DEFAULT_MAX_REGIONS = 256


@dataclass
class SharedObject:
    """One opened shared-memory object, shared by every region that names it."""

    ident: tuple[int, int]            # (st_dev, st_ino)
    key: str
    fd: int                           # read-only
    wfd: int | None = None            # read/write, opened when an output is first written
    refs: int = 0

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        for fd in (self.fd, self.wfd):
            if fd is not None:
                os.close(fd)


@dataclass
class Region:
    name: str
    key: str
    offset: int                 # of the region within the shared-memory object
    byte_size: int
    obj: SharedObject
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    users: int = 0              # requests in flight that read or write it
    retired: bool = False       # unregistered while in use: it goes when the last of them ends (as Triton)

    def status(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def shrank(self, what: str, end: int) -> InvalidInput:
        return InvalidInput(f"{what}: shared-memory region {self.name!r} is smaller than when it was registered: "
                            f"its object {self.key!r} has {self.obj.size()} bytes now, the request needs {end}")


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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open(path: Path, key: str, write: bool) -> tuple[int, os.stat_result]:
    """A descriptor of the regular file at ``path``; anything else is refused before any wait (O_NONBLOCK: a FIFO
    never blocks the open; O_NOFOLLOW: no link is followed; the type is checked before and after)."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise InvalidInput(f"shared-memory key {key!r}: no such object in {SHM_ROOT}") from None
    if not stat.S_ISREG(before.st_mode):
        raise InvalidInput(f"shared-memory key {key!r} is {_kind(before.st_mode)}, not a shared-memory object")
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InvalidInput(f"shared-memory key {key!r}: no such object in {SHM_ROOT}") from None
    except OSError as exc:
        raise InvalidInput(f"shared-memory key {key!r}: cannot open it "
                           f"{'read/write' if write else 'read-only'} ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise InvalidInput(f"shared-memory key {key!r} changed while it was opened; register it again")
    return fd, st


class SystemSharedMemory:
    """The registered regions of one server process (every worker holds the same set: see coordinator.py)."""

    def __init__(self, max_regions: int = DEFAULT_MAX_REGIONS) -> None:
        self.max_regions = max_regions
        self._regions: dict[str, Region] = {}
        self._objects: dict[tuple[int, int], SharedObject] = {}
        self._lock = threading.Lock()

    def probe(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """What :meth:`register` would refuse, checked without registering (a cluster checks a registration in
        the worker that received it before it takes the cluster's lock: a bad one never waits for it)."""
        with self._lock:
            self.check_new(name)
        os.close(self._opened(name, key, offset, byte_size)[0])

    def _opened(self, name: str, key: str, offset: int, byte_size: int) -> tuple[int, os.stat_result]:
        """The object's descriptor once every argument is checked and the region fits in it."""
        check_region_name(name)
        failed = f"failed to register shared memory region {name!r}: invalid args"     # Triton's words first
        for what, v in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 62:
                raise InvalidInput(f"{failed} ({what} must be a non-negative integer, got {v!r})")
        try:
            path = _path(key)
        except InvalidInput as exc:
            raise InvalidInput(f"cannot register shared memory region {name!r} - invalid shm key {key!r} "
                               f"({exc})") from None
        fd, st = _open(path, key, write=False)
        if byte_size == 0 or offset + byte_size > st.st_size:
            os.close(fd)
            raise InvalidInput(f"{failed} (shared-memory key {key!r}: offset {offset} + byte_size {byte_size} "
                               f"{'is empty' if byte_size == 0 else 'runs past the end of the object'}, "
                               f"{st.st_size} bytes)")
        return fd, st

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        with self._lock:
            self.check_new(name)
            fd, st = self._opened(name, key, offset, byte_size)
            ident = (st.st_dev, st.st_ino)
            obj = self._objects.get(ident)
            if obj is None:
                obj = self._objects[ident] = SharedObject(ident, key, fd)
            else:
                os.close(fd)                  # one descriptor per object, whatever the number of regions
            obj.refs += 1
            self._regions[name] = Region(name, key, offset, byte_size, obj)
        logger.info("registered shared-memory region %r (key %s, offset %d, %d bytes)", name, key, offset, byte_size)

    def unregister(self, name: str = "") -> list[str]:
        """Unregister one region, or every region for an empty name; returns the names removed. Unknown
        names are not an error (Triton's behaviour: unregistering is idempotent). A region in use by a request
        in flight stays (listed, usable) until the last such request ends, as in Triton."""
        with self._lock:
            names = [name] if name else list(self._regions)
            gone = []
            for n in names:
                r = self._regions.get(n)
                if r is None:
                    continue
                if r.users:
                    r.retired = True
                else:
                    gone.append(self._drop(r))
        return [r.name for r in gone]

    def _drop(self, r: Region) -> Region:
        """Remove a region (with the lock held); the object closes with its last region."""
        del self._regions[r.name]
        r.obj.refs -= 1
        if r.obj.refs == 0:
            del self._objects[r.obj.ident]
            r.obj.close()
        return r

    def hold(self, uses: list[tuple[str, str]]) -> list[Region]:
        """Mark the regions a request reads or writes ((region, which tensor) pairs) as in use until
        :meth:`release` (an unregister meanwhile waits for it); an unknown region is a 400 naming the tensor."""
        with self._lock:
            for name, what in uses:
                if name not in self._regions:
                    raise InvalidInput(f"{what}: shared-memory region {name!r} is not registered")
            held = [self._regions[n] for n, _ in uses]
            for r in held:
                r.users += 1
        return held

    def release(self, held: list[Region]) -> None:
        with self._lock:
            for r in held:
                r.users -= 1
                if r.retired and r.users == 0 and self._regions.get(r.name) is r:
                    self._drop(r)
                    logger.info("shared-memory region %r unregistered now that its last request ended", r.name)

    def status(self, name: str = "") -> list[dict[str, object]]:
        with self._lock:
            if name:
                if name not in self._regions:
                    raise InvalidInput(f"Unable to find system shared memory region: '{name}' (it is not "
                                       f"registered)")
                return [self._regions[name].status()]
            return [r.status() for r in self._regions.values()]

    def names(self) -> set[str]:
        return set(self._regions)

    def open_objects(self) -> int:
        """Descriptors held (one per distinct object)."""
        return len(self._objects)

    def check_new(self, name: str) -> None:
        """AlreadyExists when ``name`` is registered (Triton refuses a second registration of a name);
        LimitExceeded when ``max_regions`` are."""
        if name in self._regions:
            raise AlreadyExists(f"shared memory region {name!r} already in manager (unregister it first)")
        if len(self._regions) >= self.max_regions:
            raise LimitExceeded(f"shared-memory region {name!r}: {len(self._regions)} regions are registered, the "
                                f"most this server holds ({flag('max_shm_regions')}); unregister some first")

    def _region(self, ref: ShmRef, what: str) -> Region:
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidInput(f"{what}: shared-memory region {ref.region!r} is not registered")
        detail = (f"({what}: shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size}, the "
                  f"region has {region.byte_size} bytes)")
        if ref.offset >= region.byte_size and ref.byte_size:    # Triton's words first, for each way it can be wrong
            raise InvalidInput(f"Invalid offset for shared memory region: '{ref.region}' {detail}")
        if ref.offset + ref.byte_size >= 1 << 64:
            raise InvalidInput(f"Integer overflow detected: byte_size {ref.byte_size} + offset {ref.offset} "
                               f"{detail}")
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidInput(f"Invalid offset + byte size for shared memory region: '{ref.region}' {detail}")
        return region

    def read(self, ref: ShmRef, what: str) -> memoryview:
        """The referenced bytes, read into a buffer of the request's own (a truncated object is a 400, never a
        fault)."""
        region = self._region(ref, what)
        start = region.offset + ref.offset
        buf = bytearray(ref.byte_size)
        try:
            got = os.preadv(region.obj.fd, [buf], start) if ref.byte_size else 0
        except OSError as exc:
            raise InvalidInput(f"{what}: shared-memory region {ref.region!r} cannot be read ({exc.strerror})") from None
        if got < ref.byte_size:
            raise region.shrank(what, start + ref.byte_size)
        return memoryview(buf)

    def write(self, ref: ShmRef, data: bytes | memoryview, what: str) -> None:
        region = self._region(ref, what)
        if len(data) > ref.byte_size:
            raise InvalidInput(f"{what}: {len(data)} bytes do not fit the {ref.byte_size} bytes given by "
                               f"shared_memory_byte_size in region {ref.region!r}")
        start = region.offset + ref.offset
        with region.lock:
            obj = region.obj
            if obj.wfd is None:
                wfd, st = _open(_path(obj.key), obj.key, write=True)
                if (st.st_dev, st.st_ino) != obj.ident:
                    os.close(wfd)
                    raise InvalidInput(f"{what}: shared-memory key {obj.key!r} names another object than when region "
                                       f"{ref.region!r} was registered; register it again")
                obj.wfd = wfd
            if obj.size() < start + len(data):       # never grow a client's object behind its back
                raise region.shrank(what, start + len(data))
            try:
                written = os.pwrite(obj.wfd, data, start)
            except OSError as exc:
                raise InvalidInput(f"{what}: shared-memory region {ref.region!r} cannot be written "
                                   f"({exc.strerror})") from None
            if written < len(data):
                raise region.shrank(what, start + len(data))

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
