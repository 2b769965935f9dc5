"""``foldserve serve --workers N``: N serving processes on the same gRPC and HTTP ports, supervised.

The parent process imports neither grpc nor onnxruntime: it makes the private run folder
(:class:`server.core.runfolder.RunFolder`), fixes the ports (a port of 0 is chosen here, once, and held
with SO_REUSEPORT so the workers can share it), divides the CPU cores between the workers'
onnxruntime thread pools, and starts each worker as a fresh interpreter (``python -m server.worker``),
so no gRPC or onnxruntime state is ever forked.

It then supervises:

* when every worker is ready it marks the cluster up (readiness turns true in every worker at once)
  and prints the ``serving`` line;
* a worker that dies is replaced, after a back-off that doubles while replacements die young
  (0.5 s up to 10 s), and the death is logged with its exit status; the replacement loads the models
  and regions the cluster has now (see server/core/coordinator.py) and takes connections only once warm;
* a death before the cluster was first up stops every worker and exits 1 (a model or setting that cannot
  serve); after that the supervisor never gives up, so that no client can take the server down by killing
  workers: more than ``MAX_DEATHS`` deaths within ``DEATH_WINDOW_S`` mark it degraded (the ``up`` file goes,
  so every worker answers not ready: the server reports itself unhealthy) while it keeps replacing workers
  with back-off; once every worker has stayed up ``STABLE_S`` it is ready again;
* every ready worker is pinged over its control socket every ``HEARTBEAT_S``; one that misses ``MISSES``
  pings in a row without using the CPU meanwhile (stopped, hung, deadlocked) is killed and so replaced like a
  dead one. A worker that misses pings while it works (its CPU time grows: a burst, a large request on its event
  loop) is left to finish, up to ``MISSES_BUSY`` pings and then only while another worker answers; at most one
  worker is killed per round, so a burst never takes every worker down at once;
* SIGTERM or SIGINT is forwarded to every worker, which drains like a single server
  (``--grace-period-s``); workers still running after the grace period and 10 s more are killed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.core.peer import PING_LINE, PING_TIMEOUT_S
from server.core.runfolder import PREFIX, RUN_DIR_ENV, WORKER_ENV, RunFolder, remove_stale, reuse_port_socket
from server.settings import Settings

logger = logging.getLogger("foldserve.supervisor")

MAX_DEATHS = 5
DEATH_WINDOW_S = 60.0
BACKOFF_S = (0.5, 10.0)          # first delay, most
STABLE_S = 30.0                  # a worker that lived this long resets its back-off
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
HEARTBEAT_S = 2.0                # between pings of one worker
MISSES = 3                       # pings in a row without an answer (PING_TIMEOUT_S each) make a worker hung
MISSES_BUSY = 30                 # ... or, for a worker that uses the CPU all the while, this many (a live lock)
PROGRESS_CPU_S = 0.1             # CPU seconds a worker must use between two pings to count as working


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None
    backoff: float = BACKOFF_S[0]
    deaths: list[float] = field(default_factory=list)
    missed: int = 0                  # heartbeats in a row without an answer
    stalled: int = 0                 # of those, in a row without using the CPU either
    cpu: float = 0.0                 # its CPU seconds at the last heartbeat


def _ping(path: Path, timeout_s: float) -> bool:
    """One heartbeat: the worker answers a ping line on its control socket within ``timeout_s``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(path))
            s.sendall(PING_LINE)
            return s.recv(4096).startswith(b'{"ok": true')
    except OSError:
        return False


def cpu_seconds(pid: int) -> float | None:
    """A process's user + system CPU time, from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the supervisor dies, so no worker outlives it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _reserve(host: str, port: int) -> tuple[int, socket.socket | None]:
    """A port of 0 becomes a free port, held (bound, not listening) with SO_REUSEPORT for the workers."""
    if port:
        return port, None
    sock = reuse_port_socket(host, 0, listen=False)
    return sock.getsockname()[1], sock


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.n = settings.worker_count()
        for stale in remove_stale(Path(tempfile.gettempdir())):
            logger.warning("removed %s, left by a supervisor that was killed", stale)
        self.run = RunFolder(Path(tempfile.mkdtemp(prefix=PREFIX)))
        http_port, self._http_hold = _reserve(settings.host, settings.http_port)
        grpc_port, self._grpc_hold = _reserve(settings.host, settings.grpc_port)
        threads = settings.intra_op_threads or max(1, (os.cpu_count() or 1) // self.n)
        self.settings = settings.model_copy(update={"http_port": http_port, "grpc_port": grpc_port,
                                                    "intra_op_threads": threads})
        self.run.create()
        self.run.create_board(self.n)
        self.slots = [Slot(i) for i in range(self.n)]
        self.stopping = False
        self.up = False
        self.degraded_since: float | None = None

    # --- workers --------------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        env = {**os.environ, RUN_DIR_ENV: str(self.run.root), WORKER_ENV: str(slot.index),
               MULTIPROC_ENV: str(self.run.metrics)}
        slot.proc = subprocess.Popen([sys.executable, "-m", "server.worker"], env=env, preexec_fn=_die_with_parent,
                                     stdin=subprocess.PIPE, text=True)
        try:      # the settings (tokens inside) through a pipe, never a file
            slot.proc.stdin.write(self.settings.model_dump_json())
            slot.proc.stdin.close()
        except BrokenPipeError:
            pass      # it died at once: the loop sees it
        slot.started, slot.restart_at, slot.missed, slot.stalled = time.monotonic(), None, 0, 0
        slot.cpu = 0.0
        logger.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _forget(self, slot: Slot) -> None:
        """A dead worker's files: its readiness, its sockets, its slot on the load board, its live gauges
        (prometheus_client's mark_process_dead, done by hand so that this process never imports the metrics
        library)."""
        pid = slot.proc.pid if slot.proc else -1
        self.run.close_slot(slot.index)           # no peer hands it anything more
        for path in (self.run.ready(slot.index), self.run.socket(slot.index), self.run.handoff(slot.index),
                     *self.run.metrics.glob(f"gauge_live*_{pid}.db")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _died(self, slot: Slot, code: int) -> str | None:
        """Handle a worker's death; returns why the server must stop, or None."""
        now = time.monotonic()
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        self._forget(slot)
        if not self.up:
            return f"worker {slot.index} died while starting ({how}); see its log above"
        slot.deaths = [t for t in slot.deaths if now - t < DEATH_WINDOW_S] + [now]
        recent = sum(len([t for t in s.deaths if now - t < DEATH_WINDOW_S]) for s in self.slots)
        if recent > MAX_DEATHS and self.degraded_since is None:
            logger.error("workers keep dying (%d deaths in %g s, the last: worker %d, %s): not ready until every "
                         "worker stays up %g s; replacing them with back-off", recent, DEATH_WINDOW_S, slot.index,
                         how, STABLE_S)
            with contextlib.suppress(FileNotFoundError):
                self.run.up.unlink()
        if recent > MAX_DEATHS:
            self.degraded_since = now
        slot.backoff = BACKOFF_S[0] if now - slot.started > STABLE_S else min(slot.backoff * 2, BACKOFF_S[1])
        slot.restart_at = now + slot.backoff
        logger.error("worker %d (pid %d) died (%s); replacing it in %.1f s", slot.index, slot.proc.pid, how,
                     slot.backoff)
        slot.proc = None
        return None

    def _heartbeat(self) -> None:
        while not self.stopping:
            time.sleep(HEARTBEAT_S)
            self.heartbeat_round()

    def heartbeat_round(self) -> list[int]:
        """Ping every ready worker; kill at most one that stopped answering and is not working (see the module's
        docstring; the loop then replaces it as a dead one). Returns the indices of the workers killed."""
        pinged = []
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.poll() is not None or self.run.ready_pid(slot.index) != proc.pid:
                continue                  # not started, dead, or not yet joined: nothing to ask
            answered = _ping(self.run.socket(slot.index), PING_TIMEOUT_S)
            cpu = cpu_seconds(proc.pid)
            working = cpu is not None and cpu - slot.cpu >= PROGRESS_CPU_S
            slot.cpu = cpu if cpu is not None else slot.cpu
            slot.missed = 0 if answered else slot.missed + 1
            slot.stalled = 0 if answered or working else slot.stalled + 1
            pinged.append((slot, answered))
        anyone = any(answered for _, answered in pinged)
        for slot, _ in pinged:
            proc = slot.proc
            hung = slot.stalled >= MISSES
            if proc is None or not (hung or (slot.missed >= MISSES_BUSY and anyone)) or proc.poll() is not None:
                if slot.missed == MISSES and not hung:
                    logger.warning("worker %d (pid %d) missed %d heartbeats but keeps working (its CPU time grows): "
                                   "left to finish", slot.index, proc.pid if proc else -1, slot.missed)
                continue
            logger.error("worker %d (pid %d) stopped answering (%d heartbeats missed, %d of them without using the "
                         "CPU): killing it", slot.index, proc.pid, slot.missed, slot.stalled)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return [slot.index]           # one per round: a burst never takes every worker down at once
        return []

    def _check_recovered(self) -> None:
        """Degraded: ready again once every worker is running and none has died for STABLE_S."""
        now = time.monotonic()
        if self.degraded_since is None or now - self.degraded_since < STABLE_S:
            return
        if all(s.proc is not None and s.proc.poll() is None and self.run.ready_pid(s.index) for s in self.slots):
            self.run.up.touch()
            self.degraded_since = None
            logger.warning("every worker has stayed up %g s: ready again", STABLE_S)

    def _check_up(self) -> None:
        records = []
        for slot in self.slots:
            try:
                records.append(json.loads(self.run.ready(slot.index).read_text()))
            except (OSError, ValueError):
                return
        self.run.up.touch()
        self.up = True
        s = self.settings
        scheme = "https" if s.tls_cert else "http"
        print(json.dumps({"event": "serving", "grpc": f"{s.host}:{s.grpc_port}",
                          "http": f"{scheme}://{s.host}:{s.http_port}", "models": records[0].get("models", []),
                          "workers": self.n, "pids": [r["pid"] for r in records]}), flush=True)
        logger.info("%d workers serving gRPC on %s:%d and HTTP on %s:%d", self.n, s.host, s.grpc_port, s.host,
                    s.http_port)

    # --- the loop -------------------------------------------------------------------------------

    def serve(self) -> int:
        def stop(signum, frame) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for slot in self.slots:
            self.spawn(slot)
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        failure = None
        try:
            while not self.stopping and failure is None:
                time.sleep(0.05)
                for slot in self.slots:
                    if slot.proc is not None and (code := slot.proc.poll()) is not None:
                        failure = self._died(slot, code)
                    elif slot.proc is None and slot.restart_at is not None and time.monotonic() >= slot.restart_at:
                        self.spawn(slot)
                if not self.up and failure is None:
                    self._check_up()
                elif self.degraded_since is not None:
                    self._check_recovered()
            if failure:
                logger.error("%s: stopping every worker", failure)
            code = self.shutdown()
            return 1 if failure else code
        finally:
            shutil.rmtree(self.run.root, ignore_errors=True)

    def shutdown(self) -> int:
        """SIGTERM to every worker (each drains), SIGKILL to any still running after the grace period."""
        running = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_period_s + 10
        code = 0
        for proc in running:
            try:
                rc = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker pid %d did not stop in time: killing it", proc.pid)
                proc.kill()
                rc = proc.wait()
            code = code or (1 if rc else 0)
        return code


def supervise(settings: Settings) -> int:
    return Supervisor(settings).serve()
