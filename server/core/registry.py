"""The registry of loaded model versions: load, swap, unload, look-up and the repository index.

Loading builds a complete new set of versions (sessions created, warmed up) before it replaces the old
set in one assignment, so requests never see a half-loaded model, and a failed load leaves the previous
versions serving (the index says why the reload failed). Replaced or unloaded versions finish their
queued and running requests before their threads are released. A version is served only when its
verification passed (``allow_unverified`` overrides).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from foldserve.errors import FoldserveError, ModelNotFound, ModelNotReady
from foldserve.model_config import ModelConfig
from server.core import heap
from server.core.loader import LoadedVersion, build_version
from server.core.model_config import override_config, select_versions, version_policy
from server.core.repository import ModelRepository, check_model_name, check_version
from server.core.stats import Metrics
from server.core.types import IndexEntry
from server.settings import Settings

logger = logging.getLogger(__name__)


#: model -> version -> SHA-256 of the bytes served (what every worker of a cluster serves)
Pins = dict[str, dict[int, str]]


@dataclass
class ModelState:
    name: str
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    state: str = "UNAVAILABLE"      # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str = ""                # why the model (or its last reload) is not what was asked
    version_reasons: dict[int, str] = field(default_factory=dict)


#: ``prepare(..., override=KEEP)``: build with the config override the model has now (a catch-up, a restart);
#: ``None`` is a plain load (config.pbtxt, which ends an override); a string is a new override
KEEP = "keep the current override"


@dataclass
class Prepared:
    """Versions of one model built and warmed up, not yet served (the first phase of a load)."""

    name: str
    versions: dict[int, LoadedVersion]
    reasons: dict[int, str]
    override: str | None = KEEP


class ModelRegistry:
    def __init__(self, repository: ModelRepository, settings: Settings, metrics: Metrics) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()    # old versions draining after a swap
        # models the server was started to serve, or loaded since, and not unloaded (a failed load of a new
        # model through the repository API does not count: it must not take a serving server out of rotation)
        self._requested: set[str] = set()
        self.message_limits: dict[str, int] = {}      # model -> its largest gRPC message (see _refresh_limits)
        self.largest_message = 0
        self.overrides: dict[str, str] = {}           # model -> the config override (JSON) it was loaded with

    # --- load / unload ---------------------------------------------------------------------------

    async def load_all(self, names: list[str] | None = None, pins: Pins | None = None) -> None:
        """Load ``names`` (default: --models, else every model in the repository; with ``pins``, the pinned
        models); failures are logged."""
        if pins is not None:
            names = sorted(pins)
        for name in names if names is not None else self.settings.models or self.repository.names():
            if self.repository.has(name):
                self._requested.add(name)      # what the server was started to serve: strict readiness waits for it
            try:
                await self.load(name, pins.get(name) if pins is not None else None)
            except FoldserveError as exc:
                logger.error("model %s not loaded: %s", name, exc)

    async def load(self, name: str, pins: dict[int, str] | None = None, override: str | None = KEEP) -> ModelState:
        """Load (or reload) every version the policy selects (``pins``: exactly these versions, with exactly
        these bytes; ``override``: see :data:`KEEP`); on failure the old versions keep serving."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            prepared = await self.prepare(name, pins, override)
            return self.commit(prepared)

    def config(self, name: str, override: str | None = KEEP) -> ModelConfig:
        """The config a (re)load of ``name`` uses: config.pbtxt, or the override in force / given."""
        disk = self.repository.config(name)
        text = self.overrides.get(name) if override is KEEP else override
        return override_config(disk, text, name) if text else disk

    async def prepare(self, name: str, pins: dict[int, str] | None = None, override: str | None = KEEP
                      ) -> Prepared:
        """Build every version the policy selects (sessions created, warmed up) without serving them yet. On
        failure the index says why and the old versions keep serving (:class:`ModelNotReady`). With ``pins``
        (version -> SHA-256 of its served bytes: what the rest of a cluster serves) exactly those versions are
        built, each from exactly those bytes, or the prepare fails."""
        check_model_name(name)
        if not self.repository.has(name):
            raise ModelNotFound(f"failed to load {name!r}: failed to poll from model repository: no model {name!r} "
                                f"in it (no {name}/config.pbtxt)")
        state = self._models.setdefault(name, ModelState(name))
        if not state.versions:
            state.state = "LOADING"
        try:
            config = self.config(name, override)
            new, reasons = await asyncio.get_running_loop().run_in_executor(None, self._build, name, pins, config)
            if pins is not None and set(new) != set(pins):
                for lv in new.values():
                    await lv.scheduler.close(0)
                missing = {v: reasons.get(v, "not built") for v in sorted(set(pins) - set(new))}
                detail = "; ".join(f"version {v}: {r}" for v, r in missing.items())
                raise ModelNotReady(f"cannot serve what the cluster serves ({detail})")
            if not new:
                detail = "; ".join(f"version {v}: {r}" for v, r in sorted(reasons.items())) or "no versions"
                state.version_reasons = reasons
                raise ModelNotReady(f"no servable version: {detail}")
        except FoldserveError as exc:
            self.fail(name, str(exc))
            raise ModelNotReady(f"model {name!r} failed to load: {exc}") from None
        return Prepared(name, new, reasons, override)

    def commit(self, prepared: Prepared) -> ModelState:
        """Serve the prepared versions: one assignment, then the replaced versions drain in the background."""
        state = self._models.setdefault(prepared.name, ModelState(prepared.name))
        previous = dict(state.versions)
        for lv in prepared.versions.values():
            lv.scheduler.start()
        state.versions = prepared.versions  # the swap: requests from now on use the new versions
        if prepared.override is not KEEP:
            if prepared.override:
                self.overrides[prepared.name] = prepared.override
            else:
                self.overrides.pop(prepared.name, None)
        self._refresh_limits()
        self._requested.add(prepared.name)
        state.version_reasons = prepared.reasons
        state.state, state.reason = "READY", ""
        logger.info("model %s ready: versions %s", prepared.name, sorted(prepared.versions))
        for old in previous.values():   # kept until done: the loop holds tasks only weakly
            task = asyncio.create_task(old.scheduler.close(self.settings.grace_period_s))
            self._closing.add(task)
            task.add_done_callback(self._closed)
        if not previous:
            heap.settle()       # the new versions join what later collections skip
        return state

    def _closed(self, task: asyncio.Task[None]) -> None:
        """A replaced version drained: once none is left, the collector may look at everything again (a
        replaced version frozen with a reference cycle would never be freed), then skips what lives now."""
        self._closing.discard(task)
        if not self._closing:
            heap.resettle()

    def fail(self, name: str, reason: str) -> None:
        """Record a failed (re)load of ``name``: its old versions, if any, keep serving."""
        state = self._models.setdefault(name, ModelState(name))
        state.reason = f"reload failed, previous versions keep serving: {reason}" if state.versions else reason
        state.state = "READY" if state.versions else "UNAVAILABLE"
        logger.error("loading %s failed: %s", name, state.reason)

    async def discard(self, prepared: Prepared) -> None:
        """Release versions that were prepared and will not be served (another worker failed to load)."""
        for lv in prepared.versions.values():
            await lv.scheduler.close(0)

    def loaded_names(self) -> list[str]:
        return sorted(n for n, s in self._models.items() if s.versions)

    def served(self) -> Pins:
        """model -> version -> SHA-256 of the bytes each loaded version serves."""
        return {n: {v: lv.digest for v, lv in s.versions.items()} for n, s in self._models.items() if s.versions}

    def _build(self, name: str, pins: dict[int, str] | None, config: ModelConfig
               ) -> tuple[dict[int, LoadedVersion], dict[int, str]]:
        chosen = (sorted(pins) if pins is not None
                  else select_versions(self.repository.versions(name), version_policy(config)))
        versions: dict[int, LoadedVersion] = {}
        reasons: dict[int, str] = {}
        for v in chosen:
            try:
                lv = build_version(self.repository, name, v, config, self.settings, self.metrics)
                if pins is not None and lv.digest != pins[v]:
                    raise ModelNotReady(f"its bytes on disk (SHA-256 {lv.digest[:12]}...) differ from what the "
                                        f"cluster serves ({pins[v][:12]}...): the files changed since it was loaded")
                versions[v] = lv
            except FoldserveError as exc:
                reasons[v] = str(exc)
                logger.error("model %s version %d: %s", name, v, exc)
            except Exception as exc:  # a broken model must never take the server down
                logger.exception("model %s version %d failed to load", name, v)
                reasons[v] = f"failed to load ({type(exc).__name__}; see the server log)"
        return versions, reasons

    def _refresh_limits(self) -> None:
        """The largest gRPC message each loaded model (and any of them) can need: read per request, so computed
        when the loaded versions change, not on the hot path."""
        limits = {n: max(lv.grpc_message_limit for lv in s.versions.values())
                  for n, s in self._models.items() if s.versions}
        self.message_limits, self.largest_message = limits, max(limits.values(), default=0)

    def unready_requested(self) -> list[str]:
        """Models asked for that serve no version now (a failed first load): what strict readiness waits for."""
        return sorted(n for n in self._requested if not (n in self._models and self._models[n].versions))

    async def unload(self, name: str) -> None:
        check_model_name(name)
        self._requested.discard(name)
        self.overrides.pop(name, None)
        state = self._models.get(name)
        if state is None or not state.versions:
            raise ModelNotFound(f"model {name!r} is not loaded")
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = dict(state.versions)
            if not old:
                raise ModelNotFound(f"model {name!r} is not loaded")
            state.versions = {}
            self._refresh_limits()
            state.state, state.reason = "UNAVAILABLE", "unloaded"
        await asyncio.gather(*(lv.scheduler.close(self.settings.grace_period_s) for lv in old.values()))
        old.clear()
        heap.resettle()
        logger.info("model %s unloaded", name)

    async def close(self) -> None:
        for state in self._models.values():
            await asyncio.gather(*(lv.scheduler.close(self.settings.grace_period_s) for lv in state.versions.values()))

    # --- look-up ----------------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedVersion:
        """The version to serve; ModelNotFound for an unknown model or version, ModelNotReady for a known one
        that cannot serve now."""
        check_model_name(name)
        v = check_version(version)
        state = self._models.get(name)
        # Triton's words first (clients match on them), then ours
        unknown = f"Request for unknown model: '{name}'"
        if state is None:
            if self.repository.has(name):
                raise ModelNotReady(f"{unknown} has no available versions: model {name!r} is not loaded")
            raise ModelNotFound(f"{unknown} is not found: no model {name!r} in the repository")
        if v is None:
            if not state.versions:
                raise ModelNotReady(f"{unknown} has no available versions: model {name!r} is not ready: "
                                    f"{state.reason or state.state}")
            return state.versions[max(state.versions)]
        if v in state.versions:
            return state.versions[v]
        if v in state.version_reasons:
            raise ModelNotReady(f"model {name!r} version {v} is not ready: {state.version_reasons[v]}")
        raise ModelNotFound(f"{unknown} version {v} is not found (loaded: {sorted(state.versions) or 'none'})")

    def loaded_versions(self, name: str) -> list[LoadedVersion]:
        """The loaded versions of ``name``, ascending (ModelNotFound / ModelNotReady as :meth:`get`)."""
        self.get(name)
        return [lv for _, lv in sorted(self._models[name].versions.items())]

    def index(self) -> list[IndexEntry]:
        out: list[IndexEntry] = []
        for name in sorted(set(self.repository.names()) | set(self._models)):
            state = self._models.get(name)
            if state is None:
                out.append(IndexEntry(name, "", "UNAVAILABLE", "not loaded"))
                continue
            for v in sorted(state.versions):
                out.append(IndexEntry(name, str(v), "READY", state.reason))
            for v, r in sorted(state.version_reasons.items()):
                if v not in state.versions:
                    out.append(IndexEntry(name, str(v), "UNAVAILABLE", r))
            if not state.versions and (state.reason or not state.version_reasons):
                out.append(IndexEntry(name, "", state.state, state.reason))
        return out

    def ready_versions(self) -> list[LoadedVersion]:
        return [lv for s in self._models.values() for lv in s.versions.values()]
