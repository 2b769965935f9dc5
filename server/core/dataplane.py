"""The data plane: every v2 operation, in the core's own types. gRPC and REST only translate to it."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from foldserve import __version__
from foldserve.errors import FoldserveError, InvalidInput, PermissionDenied, ServerNotReady
from server.core.repository import LoadedVersion, ModelManager, check_model_name
from server.core.stats import Metrics
from server.core.types import InferOutput, InferRequest, InferResponse
from server.core.validation import validate_request
from server.settings import Settings

logger = logging.getLogger(__name__)

EXTENSIONS = ["classification", "binary_tensor_data", "model_repository", "model_configuration",
              "statistics", "schedule_policy"]


class DataPlane:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.models = ModelManager(settings, self.metrics)
        self._ready = False
        self._live = True
        self._inflight = 0

    # --- server ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.models.load_all()
        self._ready = True

    def begin_shutdown(self) -> None:
        """Readiness goes false at once; new inference requests are refused."""
        self._ready = False

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no inference request is in flight (or the timeout passes); True when drained."""
        import asyncio

        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._inflight == 0

    async def stop(self) -> None:
        self._ready = False
        await self.models.close()

    def live(self) -> bool:
        return self._live

    def ready(self) -> bool:
        return self._ready

    def metadata(self) -> dict[str, Any]:
        return {"name": "foldserve", "version": __version__, "extensions": EXTENSIONS}

    def render_metrics(self) -> str:
        """Prometheus text: the counters and histograms, plus queue and in-flight gauges."""
        lines = [self.metrics.render().rstrip("\n"),
                 "# HELP foldserve_queue_length Requests waiting for an execution.",
                 "# TYPE foldserve_queue_length gauge"]
        for lv in self.models.ready_models():
            lines.append(f'foldserve_queue_length{{model="{lv.name}",version="{lv.version}"}} '
                         f"{lv.scheduler.queue_length}")
        lines += ["# HELP foldserve_inflight_requests Inference requests being handled.",
                  "# TYPE foldserve_inflight_requests gauge", f"foldserve_inflight_requests {self._inflight}"]
        return "\n".join(lines) + "\n"

    # --- models ---------------------------------------------------------------------------------

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.models.get(name, version)
            return self._ready
        except InvalidInput:
            raise
        except FoldserveError:
            return False

    def model(self, name: str, version: str = "") -> LoadedVersion:
        return self.models.get(name, version)

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        lv = self.models.get(name, version)
        spec = lv.spec
        state = self.models.models[name]
        return {
            "name": name,
            "versions": [str(v) for v in sorted(state.versions)],
            "platform": spec.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.full_shape(spec.max_batch_size)}
                       for t in spec.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.full_shape(spec.max_batch_size)}
                        for t in spec.outputs],
            "parameters": {"verification": lv.verification, "provider": lv.runtime.provider,
                           "version": str(lv.version)},
        }

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        return self.models.get(name, version).spec.config

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        if name:
            check_model_name(name)
            if version:
                return [self.models.get(name, version).stats.to_dict()]
            self.models.get(name)
            return [lv.stats.to_dict() for lv in sorted(self.models.models[name].versions.values(),
                                                         key=lambda lv: lv.version)]
        return [lv.stats.to_dict() for lv in self.models.ready_models()]

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        idx = self.models.index()
        return [m for m in idx if m["state"] == "READY"] if ready_only else idx

    async def load(self, name: str) -> None:
        self._check_repository_api()
        await self.models.load(name)

    async def unload(self, name: str) -> None:
        self._check_repository_api()
        await self.models.unload(name)

    def _check_repository_api(self) -> None:
        if not self.settings.repository_api:
            raise PermissionDenied("the repository load/unload API is disabled; start the server with "
                                   "--repository-api (and --admin-token) to enable it")

    # --- inference -------------------------------------------------------------------------------

    async def infer(self, req: InferRequest, protocol: str = "core") -> InferResponse:
        t0 = time.perf_counter()
        code = "OK"
        lv: LoadedVersion | None = None
        batch = 0
        self._inflight += 1
        try:
            if not self._ready:
                raise ServerNotReady("the server is not ready (starting or shutting down)")
            lv = self.models.get(req.model_name, req.model_version)
            feeds, batch = validate_request(req, lv.spec, self.settings.max_elements)
            if lv.spec.max_batch_size == 0:
                batch = 1
            wanted = [o.name for o in req.outputs] or [t.name for t in lv.spec.outputs]
            results, queued = await lv.scheduler.infer(feeds, wanted, batch, self.settings.request_timeout_s)
            outputs = []
            requested = {o.name: o for o in req.outputs}
            for name, arr in zip(wanted, results):
                spec = lv.spec.output(name)
                ro = requested.get(name)
                if ro is not None and ro.class_count:
                    outputs.append(_classification(name, arr, ro.class_count, lv.spec.labels, lv.spec.max_batch_size > 0))
                    continue
                outputs.append(InferOutput(name, spec.datatype, list(arr.shape), arr,
                                           ro.binary if ro is not None else None))
            lv.stats.record_request(True, int((time.perf_counter() - t0) * 1e9), int(queued * 1e9), batch)
            return InferResponse(req.model_name, str(lv.version), req.id, outputs)
        except FoldserveError as exc:
            code = exc.grpc_status
            if lv is not None:
                lv.stats.record_request(False, int((time.perf_counter() - t0) * 1e9), 0, batch)
            raise
        except Exception:
            code = "INTERNAL"
            if lv is not None:
                lv.stats.record_request(False, int((time.perf_counter() - t0) * 1e9), 0, batch)
            raise
        finally:
            self._inflight -= 1
            model = req.model_name if lv is not None else "_unknown"
            self.metrics.request(model, protocol, code, time.perf_counter() - t0)


def _classification(name: str, arr: np.ndarray, k: int, labels: list[str], batched: bool) -> InferOutput:
    """Triton's classification extension: "score:index[:label]" strings for the top k classes."""
    scores = arr if batched else arr[None]
    flat = scores.reshape(scores.shape[0], -1)
    k = min(k, flat.shape[1])
    idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    rows = []
    for r, row in enumerate(idx):
        rows.append([f"{flat[r, i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) else "") for i in row])
    out = np.array(rows, dtype=object)
    if not batched:
        out = out[0]
    return InferOutput(name, "BYTES", list(out.shape), out)
