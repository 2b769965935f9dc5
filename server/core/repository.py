"""The model repository (Triton's layout) and the registry of loaded model versions.

Loading builds a complete new set of versions (sessions created, warmed up) before it replaces the old
set in one assignment, so requests never see a half-loaded model, and a failed load leaves the previous
versions serving. Replaced or unloaded versions finish their queued and running requests before their
threads are released.

A version is served as ready only when its ``verification.json`` says it passed (``allow_unverified``
overrides); the verification summary is part of the model's metadata and config parameters.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foldserve.errors import FoldserveError, InvalidInput, ModelNotFound, ModelNotReady
from foldserve.names import RULE, is_valid_model_name
from server.core.datatypes import V2_TO_NUMPY
from server.core.model_config import complete_config, read_config, select_versions, to_spec
from server.core.runtime import OnnxModel
from server.core.scheduler import Scheduler
from server.core.stats import Metrics, ModelStats
from server.core.types import ModelSpec
from server.settings import Settings

logger = logging.getLogger(__name__)



def check_model_name(name: str, field_name: str = "model name") -> str:
    if not is_valid_model_name(name):
        raise InvalidInput(f"{field_name} {name!r} is not valid: {RULE}")
    return name


def check_version(version: str) -> int | None:
    if version in ("", None):
        return None
    if not str(version).isdigit() or len(str(version)) > 18:
        raise InvalidInput(f"model version {version!r} is not valid: expected a positive integer")
    return int(version)


@dataclass
class LoadedVersion:
    name: str
    version: int
    spec: ModelSpec
    runtime: OnnxModel
    scheduler: Scheduler
    stats: ModelStats
    verification: dict[str, Any]
    path: Path


@dataclass
class ModelState:
    name: str
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    state: str = "UNAVAILABLE"      # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str = ""
    version_reasons: dict[int, str] = field(default_factory=dict)


def read_verification(version_dir: Path) -> dict[str, Any]:
    path = version_dir / "verification.json"
    if not path.is_file():
        return {"passed": False, "reason": "no verification.json (run `foldserve verify`)"}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"passed": False, "reason": f"unreadable verification.json ({exc})"}
    served = report.get("candidates", {}).get("served_onnx", {})
    return {"passed": bool(report.get("passed")), "reason": report.get("failure", ""),
            "max_abs_error": served.get("max_abs"), "max_rel_error": served.get("max_rel"),
            "top1_agreement": served.get("top1_agreement"), "provider": report.get("provider"),
            "tolerance": report.get("tolerance"), "warnings": len(report.get("warnings", []))}


def _read_labels(model_dir: Path, version_dir: Path) -> list[str]:
    for p in (version_dir / "labels.txt", model_dir / "labels.txt"):
        if p.is_file():
            return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return []


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.root = Path(settings.repository)
        self.models: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # --- repository ---------------------------------------------------------------------------------

    def scan(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "config.pbtxt").is_file())

    def _model_dir(self, name: str) -> Path:
        check_model_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root.resolve():
            raise InvalidInput(f"model name {name!r} is not valid")
        return path

    # --- load / unload ---------------------------------------------------------------------------

    async def load_all(self) -> None:
        names = self.settings.models or self.scan()
        for name in names:
            try:
                await self.load(name)
            except FoldserveError as exc:
                logger.error("model %s not loaded: %s", name, exc)

    async def load(self, name: str) -> ModelState:
        """Load (or reload) every version the policy selects; on failure the old versions keep serving."""
        model_dir = self._model_dir(name)
        if not (model_dir / "config.pbtxt").is_file():
            raise ModelNotFound(f"model {name!r} is not in the repository {self.root} (no {name}/config.pbtxt)")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            state = self.models.setdefault(name, ModelState(name))
            previous = dict(state.versions)
            if not previous:
                state.state = "LOADING"
            try:
                new_versions, reasons = await asyncio.get_running_loop().run_in_executor(
                    None, self._build_versions, name, model_dir)
            except FoldserveError as exc:
                state.reason = str(exc)
                state.state = "READY" if previous else "UNAVAILABLE"
                logger.error("loading %s failed: %s%s", name, exc, " (previous version keeps serving)" if previous else "")
                raise ModelNotReady(f"model {name!r} failed to load: {exc}") from None
            if not new_versions:
                state.version_reasons = reasons
                state.reason = "; ".join(f"version {v}: {r}" for v, r in sorted(reasons.items())) or "no versions"
                state.state = "READY" if previous else "UNAVAILABLE"
                logger.error("model %s has no servable version: %s", name, state.reason)
                raise ModelNotReady(f"model {name!r} has no servable version: {state.reason}")
            for lv in new_versions.values():
                lv.scheduler.start()
            state.versions = new_versions  # the swap: requests from now on use the new versions
            state.version_reasons = reasons
            state.state, state.reason = "READY", ""
            logger.info("model %s ready: versions %s", name, sorted(new_versions))
        for old in previous.values():
            asyncio.create_task(old.scheduler.close(self.settings.grace_period_s))
        return state

    def _build_versions(self, name: str, model_dir: Path) -> tuple[dict[int, LoadedVersion], dict[int, str]]:
        config = read_config(model_dir)
        available = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not available:
            raise ModelNotReady(f"{model_dir}: no numeric version folders")
        base_spec = to_spec(config, [], self.settings.instances)
        chosen = select_versions(available, base_spec.version_policy)
        versions: dict[int, LoadedVersion] = {}
        reasons: dict[int, str] = {}
        for v in chosen:
            try:
                versions[v] = self._build_version(name, model_dir, v, config)
            except FoldserveError as exc:
                reasons[v] = str(exc)
                logger.error("model %s version %d: %s", name, v, exc)
            except Exception as exc:  # a broken model must never take the server down
                logger.exception("model %s version %d failed to load", name, v)
                reasons[v] = f"failed to load ({type(exc).__name__}; see the server log)"
        return versions, reasons

    def _build_version(self, name: str, model_dir: Path, version: int, config) -> LoadedVersion:
        vdir = model_dir / str(version)
        onnx_path = vdir / (config.default_model_filename or "model.onnx")
        if not onnx_path.is_file():
            raise ModelNotReady(f"{onnx_path.name} is missing in {vdir}")
        verification = read_verification(vdir)
        if not verification["passed"] and not self.settings.allow_unverified:
            raise ModelNotReady(f"verification did not pass ({verification['reason'] or 'failed'}); "
                                f"re-run `foldserve verify` or start with --allow-unverified")
        _check_onnx(onnx_path, vdir)
        s = self.settings
        runtime = OnnxModel(onnx_path, provider=s.provider, device_id=s.device_id, intra_op_threads=s.intra_op_threads,
                            inter_op_threads=s.inter_op_threads, io_binding=s.io_binding, spin=s.spin)
        cfg = type(config)()
        cfg.CopyFrom(config)
        complete_config(cfg, runtime.inputs, runtime.outputs)
        cfg.parameters["foldserve_verified"].string_value = "true" if verification["passed"] else "false"
        cfg.parameters["foldserve_verification"].string_value = json.dumps(verification, sort_keys=True)
        cfg.parameters["foldserve_provider"].string_value = runtime.provider
        spec = to_spec(cfg, _read_labels(model_dir, vdir), s.instances)
        _check_spec_matches_model(spec, runtime)
        delay = None
        if s.batching and spec.batching is not None:
            us = s.max_queue_delay_us if s.max_queue_delay_us is not None else spec.batching.max_queue_delay_us
            delay = us / 1e6
        stats = ModelStats(name, str(version))
        scheduler = Scheduler(f"{name}:{version}", runtime.run, max_batch_size=spec.max_batch_size, max_delay_s=delay,
                              max_queue=s.max_queue_size, instances=spec.instances, stats=stats, metrics=self.metrics,
                              eager=s.batch_policy == "eager")
        if s.warmup:
            try:
                scheduler.run_estimate_s = _warmup(spec, runtime)
            except Exception as exc:  # some models reject zero-filled inputs; they can still serve
                logger.warning("warm-up of %s version %d failed (%s): serving without warm-up", name, version,
                               str(exc).splitlines()[0][:200])
        return LoadedVersion(name, version, spec, runtime, scheduler, stats, verification, vdir)

    async def unload(self, name: str) -> None:
        check_model_name(name)
        state = self.models.get(name)
        if state is None or not state.versions:
            raise ModelNotFound(f"model {name!r} is not loaded")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = dict(state.versions)
            state.versions = {}
            state.state, state.reason = "UNAVAILABLE", "unloaded"
        await asyncio.gather(*(lv.scheduler.close(self.settings.grace_period_s) for lv in old.values()))
        logger.info("model %s unloaded", name)

    async def close(self) -> None:
        for state in self.models.values():
            await asyncio.gather(*(lv.scheduler.close(self.settings.grace_period_s) for lv in state.versions.values()))

    # --- lookup -----------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedVersion:
        check_model_name(name)
        v = check_version(version)
        state = self.models.get(name)
        if state is None:
            if (self.root / name / "config.pbtxt").is_file():
                raise ModelNotReady(f"model {name!r} is not loaded")
            raise ModelNotFound(f"unknown model {name!r}")
        if v is None:
            if not state.versions:
                raise ModelNotReady(f"model {name!r} is not ready: {state.reason or state.state}")
            return state.versions[max(state.versions)]
        if v in state.versions:
            return state.versions[v]
        if v in state.version_reasons:
            raise ModelNotReady(f"model {name!r} version {v} is not ready: {state.version_reasons[v]}")
        raise ModelNotFound(f"model {name!r} has no version {v} loaded (loaded: {sorted(state.versions) or 'none'})")

    def index(self) -> list[dict[str, str]]:
        out = []
        for name in sorted(set(self.scan()) | set(self.models)):
            state = self.models.get(name)
            if state is None:
                out.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "not loaded"})
                continue
            for v in sorted(state.versions):
                out.append({"name": name, "version": str(v), "state": "READY", "reason": ""})
            for v, r in sorted(state.version_reasons.items()):
                if v not in state.versions:
                    out.append({"name": name, "version": str(v), "state": "UNAVAILABLE", "reason": r})
            if not state.versions and not state.version_reasons:
                out.append({"name": name, "version": "", "state": state.state, "reason": state.reason})
            elif not state.versions and state.reason:
                out.append({"name": name, "version": "", "state": state.state, "reason": state.reason})
        return out

    def ready_models(self) -> list[LoadedVersion]:
        return [lv for s in self.models.values() for lv in s.versions.values()]


def _check_onnx(path: Path, vdir: Path) -> None:
    """onnx.checker before onnxruntime sees the file; external data must stay inside the version folder."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = next((e.value for e in t.external_data if e.key == "location"), "")
                target = (vdir / loc).resolve()
                if Path(loc).is_absolute() or vdir.resolve() not in target.parents:
                    raise ModelNotReady(f"{path.name}: external data {loc!r} points outside the model folder")
        onnx.checker.check_model(str(path))
    except ModelNotReady:
        raise
    except Exception as exc:  # checker/decoder errors of many types
        raise ModelNotReady(f"{path.name} is not a valid ONNX model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None


def _check_spec_matches_model(spec: ModelSpec, runtime: OnnxModel) -> None:
    names = {n for n, _, _ in runtime.inputs}
    for t in spec.inputs:
        if t.name not in names:
            raise ModelNotReady(f"config.pbtxt input {t.name!r} is not an input of the ONNX model ({sorted(names)})")
        if t.datatype not in V2_TO_NUMPY:
            raise ModelNotReady(f"config.pbtxt input {t.name!r}: datatype {t.datatype} is not supported")
    outs = {n for n, _, _ in runtime.outputs}
    for t in spec.outputs:
        if t.name not in outs:
            raise ModelNotReady(f"config.pbtxt output {t.name!r} is not an output of the ONNX model ({sorted(outs)})")


def _warmup(spec: ModelSpec, runtime: OnnxModel) -> float:
    """One run per power-of-two batch size up to max_batch_size, so the first requests are not slow.
    Returns the best of three timed batch-1 runs (seconds)."""
    sizes = [1]
    while spec.max_batch_size > 0 and sizes[-1] * 2 <= spec.max_batch_size:
        sizes.append(sizes[-1] * 2)
    t0 = time.perf_counter()
    for b in sizes if spec.max_batch_size > 0 else [0]:
        feeds = {}
        for t in spec.inputs:
            dims = [d if d > 0 else 1 for d in t.dims]
            shape = ([b] if spec.max_batch_size > 0 else []) + dims
            feeds[t.name] = np.zeros(shape, dtype=V2_TO_NUMPY[t.datatype])
        runtime.run(feeds)
        if b in (0, 1):
            one = feeds
    timings = []
    for _ in range(3):
        t = time.perf_counter()
        runtime.run(one)
        timings.append(time.perf_counter() - t)
    logger.info("warmed up %s over batch sizes %s in %.2f s", spec.name, sizes, time.perf_counter() - t0)
    return min(timings)
