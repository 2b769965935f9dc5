"""A version's load measured alone: the onnxruntime session built and warmed in a child process (the loader
module run as a program), whose resident-memory growth is the load's own allocation and nothing else's.

The loader measures a load by the growth of its own process first (free, and exact when the process does
nothing else). When that growth is past the load's budget, requests served during the load may have grown
it, so the load is judged again here, where no request can reach it (an inference client can never fail
an admin load)."""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass

from foldserve.errors import ModelNotReady
from foldserve.records import first_line

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 300.0     # a load that takes longer alone than this is refused (the in-process load took as long)


@dataclass
class ProbeRequest:
    """What the child needs to build and warm the version exactly as the loader did."""

    model: bytes
    external: dict[str, bytes]
    label: str
    runtime_options: dict[str, object]      # OnnxModel keyword arguments (provider, threads, spin, ...)
    spec: object                            # the completed ModelSpec
    model_dir: str
    max_elements: int
    warm: bool


def growth_alone(request: ProbeRequest, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Bytes of resident memory that building and warming the version costs in a process of its own."""
    try:
        done = subprocess.run([sys.executable, "-m", "server.core.loader"], input=pickle.dumps(request),
                              capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ModelNotReady(f"measuring the load alone took more than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        why = first_line(lines[-1] if lines else "no message", 300)
        raise ModelNotReady(f"measuring the load alone failed (exit {done.returncode}): {why}")
    return int(done.stdout.decode().strip().splitlines()[-1])


def rss_bytes() -> int:
    """This process's resident memory (what a load grows)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
