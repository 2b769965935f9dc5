"""Replace a directory with another so that, at every instant, one complete version of it exists.

Linux's ``renameat2(RENAME_EXCHANGE)`` swaps two paths atomically; where it is missing the old folder is
renamed aside first (``.old-NAME-PID``), and :func:`recover` puts such a folder back if a kill left no
new one in its place. Leftover staging folders of dead processes are removed by :func:`clean_leftovers`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
STAGING_PREFIX, OLD_PREFIX = ".staging-", ".old-"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return bool(fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0)


def staging_dir(parent: Path, name: str) -> Path:
    """A new, empty staging folder in ``parent`` whose name ends with this process's pid (so that
    :func:`clean_leftovers` can tell ours from a dead process's)."""
    import tempfile

    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", suffix=f"-{os.getpid()}", dir=parent))
    path.chmod(0o755)
    return path


def install_dir(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``, replacing what is there."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old content
        return
    aside = target.parent / f"{OLD_PREFIX}{target.name}-{os.getpid()}"
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def clean_leftovers(parent: Path) -> None:
    """Remove staging folders of processes that are gone; put back old folders a kill left aside."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if not p.is_dir() or not p.name.startswith((STAGING_PREFIX, OLD_PREFIX)):
            continue
        pid = _owner(p.name)
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue
        if p.name.startswith(OLD_PREFIX):
            original = parent / p.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if not original.exists():
                os.replace(p, original)
                logger.warning("restored %s, left aside by an interrupted replacement", original.name)
                continue
        shutil.rmtree(p, ignore_errors=True)
        logger.info("removed leftover %s", p.name)
