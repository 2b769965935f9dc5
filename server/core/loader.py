"""Build one servable model version from its folder: the verification gate, the ONNX checks, the
onnxruntime session, the completed spec, the scheduler, and the warm-up."""
from __future__ import annotations

import json
import logging
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foldserve.datatypes import deserialize_bytes, lookup, numpy_dtype, string_array
from foldserve.entry import MODEL_FILE, PRECISION_FILE, VERIFICATION_FILE, read_precision
from foldserve.errors import EntryError, FoldserveError, ModelNotReady, UnsupportedDataType
from foldserve.model_config import ModelConfig
from foldserve.protocol import model_config_pb2 as mc
from foldserve.records import PrecisionInfo, first_line
from server.core.loadprobe import ProbeRequest, growth_alone, rss_bytes
from server.core.model_config import complete_config, to_spec
from server.core.repository import ModelRepository, VerificationSummary, read_verification
from server.core.runtime import OnnxModel
from server.core.scheduler import Scheduler
from server.core.stats import Metrics, ModelStats
from server.core.strings import opaque_strings
from server.core.types import ModelSpec
from server.core.validation import grpc_message_limit, request_bytes_limit, request_elements_limit
from server.settings import Settings, flag

logger = logging.getLogger(__name__)


@dataclass
class LoadedVersion:
    name: str
    version: int
    spec: ModelSpec
    runtime: OnnxModel
    scheduler: Scheduler
    stats: ModelStats
    verification: VerificationSummary
    preprocess: dict[str, Any] | None
    precision: PrecisionInfo
    request_bytes_limit: int          # the largest request this model can need (REST bodies are cut there)
    request_elements_limit: int       # the most tensor elements a request can carry (JSON numbers past it: 413)
    grpc_message_limit: int = 0       # the largest gRPC message (decompressed) this model can need
    digest: str = ""                  # SHA-256 over the bytes served (model file and external data): what a
                                      # cluster pins, so that every worker serves the very same bytes


def build_version(repo: ModelRepository, name: str, version: int, config: ModelConfig, settings: Settings,
                  metrics: Metrics) -> LoadedVersion:
    vdir = repo.version_dir(name, version)
    onnx_path = vdir / (config.default_model_filename or MODEL_FILE)
    if not onnx_path.is_file():
        raise ModelNotReady(f"{onnx_path.name} is missing in version {version}")
    for path in (onnx_path, vdir / VERIFICATION_FILE, vdir / PRECISION_FILE):   # no file from outside the repository
        if path.exists() or path.is_symlink():
            repo.inside(path, f"version {version}")
    files = read_model_bytes(onnx_path, vdir, settings.max_model_memory_mb)   # what is hashed is what is loaded
    rss_before = rss_bytes()
    verification = read_verification(vdir, onnx_path.name, files.digests)
    if not verification.passed and not settings.allow_unverified:
        raise ModelNotReady(f"verification did not pass ({verification.reason or 'failed'}); "
                            f"re-run `foldserve verify` or start with {flag('allow_unverified')}")
    s = settings
    options: dict[str, Any] = dict(provider=s.provider, device_id=s.device_id, intra_op_threads=s.intra_op_threads,
                                   inter_op_threads=s.inter_op_threads, io_binding=s.io_binding, spin=s.spin)
    runtime = OnnxModel(files.model, external=files.external, label=onnx_path.name, **options)
    runtime.opaque_strings = files.opaque_strings
    cfg = ModelConfig()
    cfg.CopyFrom(config)
    complete_config(cfg, runtime.inputs, runtime.outputs)
    preprocess = repo.preprocess(name, version)
    cfg.parameters["foldserve_verified"].string_value = "true" if verification.passed else "false"
    cfg.parameters["foldserve_verification"].string_value = json.dumps(verification.to_dict(), sort_keys=True)
    cfg.parameters["foldserve_provider"].string_value = runtime.provider
    try:
        precision = read_precision(vdir)
    except EntryError as exc:
        raise ModelNotReady(str(exc)) from None
    cfg.parameters["foldserve_precision"].string_value = precision.precision   # this version's, exactly
    cfg.parameters["foldserve_precision_record"].string_value = json.dumps(precision.to_json(), sort_keys=True)
    if preprocess is not None:
        cfg.parameters["foldserve_preprocess"].string_value = json.dumps(preprocess, sort_keys=True)
    spec = to_spec(cfg, repo.labels(name, version), s.instances)
    spec.opaque_strings = files.opaque_strings
    check_spec_matches_model(spec, runtime)
    delay = None
    if s.batching and spec.batching is not None:
        us = s.max_queue_delay_us if s.max_queue_delay_us is not None else spec.batching.max_queue_delay_us
        delay = us / 1e6
    stats = ModelStats(name, str(version))
    scheduler = Scheduler(f"{name}:{version}", runtime.run, max_batch_size=spec.max_batch_size, max_delay_s=delay,
                          max_queue=s.max_queue_size, instances=spec.instances, stats=stats, metrics=metrics,
                          eager=s.batch_policy == "eager", policy=spec.batching)
    check_batch_bound(spec, s.max_elements)
    if s.warmup:
        scheduler.run_estimate_s = warmup(spec, runtime, repo.model_dir(name), s.max_elements)
    grown = rss_bytes() - rss_before
    if grown > files.budget:   # requests served meanwhile may have grown the process: judge the load alone
        judge_alone(ProbeRequest(files.model, files.external, onnx_path.name, options, spec,
                                 str(repo.model_dir(name)), s.max_elements, s.warmup), name, version, grown,
                    files.budget)
    metrics.model_loaded(name, str(version))
    return LoadedVersion(name, version, spec, runtime, scheduler, stats, verification, preprocess, precision,
                         request_bytes_limit(spec, s.max_elements, s.max_request_bytes),
                         request_elements_limit(spec, s.max_elements, s.max_string_elements),
                         grpc_message_limit(spec, s.max_elements, s.max_request_bytes), files.digest())


@dataclass(frozen=True)
class ModelBytes:
    """A version's served model as read from disk, once: the bytes that are hashed against verification.json are
    the bytes onnxruntime loads (a file swapped in between can never be served as verified)."""

    name: str                        # the model file's name in the version folder
    model: bytes
    external: dict[str, bytes]       # external data: location (relative to the version folder) -> bytes
    digests: dict[str, str]          # SHA-256 of each of those files, computed once
    budget: int                      # bytes this version's load may cost (--max-model-memory-mb)
    opaque_strings: bool = False     # string elements only moved, never read: any bytes can travel (strings.py)

    def digest(self) -> str:
        """One SHA-256 over every file's (name and digest): equal only for the same bytes under the same names."""
        return _sha256("\n".join(f"{n} {d}" for n, d in sorted(self.digests.items())).encode())


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_model_bytes(path: Path, vdir: Path, max_model_memory_mb: int = 0) -> ModelBytes:
    """The model file and its external data, each read once, hashed and checked on those bytes (onnx.checker,
    external data inside the version folder, no tensor of known shape beyond the load budget); every problem
    is a ModelNotReady."""
    import onnx

    size = path.stat().st_size          # refused before it is read: a 2.2 GB sparse file cost its read first
    if max_model_memory_mb and size > max_model_memory_mb << 20:
        raise ModelNotReady(f"{path.name} is {size >> 20} MB, more than the {max_model_memory_mb} MB a load may cost "
                            f"({flag('max_model_memory_mb')})")
    if size >= 2**31:
        raise ModelNotReady(f"{path.name} is {size >> 20} MB: an ONNX protobuf is at most 2 GB (larger weights go "
                            f"in external data)")
    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
        external: dict[str, bytes] = {}
        inlined = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        for t in inlined:
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            target = (vdir / loc).resolve()
            if not loc or Path(loc).is_absolute() or vdir.resolve() not in target.parents:
                raise ModelNotReady(f"{path.name}: external data {loc!r} points outside the model folder")
            if loc not in external:
                if max_model_memory_mb and target.stat().st_size > max_model_memory_mb << 20:
                    raise ModelNotReady(f"{path.name}: external data {loc!r} is more than the {max_model_memory_mb} "
                                        f"MB a load may cost ({flag('max_model_memory_mb')})")
                external[loc] = target.read_bytes()
            start, length = int(info.get("offset", 0)), info.get("length")
            blob = external[loc]
            end = start + int(length) if length is not None else len(blob)
            if end > len(blob):
                raise ModelNotReady(f"{path.name}: external data {loc!r} is shorter than tensor {t.name!r} needs")
            # the checker reads external data from files: check a copy with the bytes that will be loaded inlined
            t.raw_data, t.data_location = blob[start:end], onnx.TensorProto.DEFAULT
            del t.external_data[:]
        for vi in [*model.graph.input, *model.graph.output]:   # a scalar declared without a shape (Triton's scalar
            if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):   # models): runs
                vi.type.tensor_type.shape.SetInParent()   # in onnxruntime, the checker wants the field on the copy
        onnx.checker.check_model(model)
        size = len(data) + sum(len(b) for b in external.values())
        budget = max_model_memory_mb << 20 if max_model_memory_mb else max(1 << 30, 8 * size)
        check_static_sizes(model, path.name, budget)
    except ModelNotReady:
        raise
    except Exception as exc:  # decoder/checker/OS errors of many types
        first = first_line(exc, 300) if str(exc).strip() else ""
        raise ModelNotReady(f"{path.name} is not a valid ONNX model ({type(exc).__name__}: "
                            f"{first.replace(str(vdir.resolve()), '.').replace(str(vdir), '.')})") from None
    digests = {path.name: _sha256(data), **{loc: _sha256(b) for loc, b in external.items()}}
    return ModelBytes(path.name, data, external, digests, budget, opaque_strings(model.graph))


def judge_alone(request: ProbeRequest, name: str, version: int, grown: int, budget: int) -> None:
    """Refuse the load if building and warming it alone (in a child process) takes more than its budget."""
    alone = growth_alone(request)
    if alone > budget:
        raise ModelNotReady(f"building and warming version {version} takes {alone >> 20} MB (measured alone), "
                            f"more than the {budget >> 20} MB a load may cost ({flag('max_model_memory_mb')})")
    logger.info("%s version %d: the process grew by %d MB during the load, the load alone by %d MB (within its "
                "%d MB)", name, version, grown >> 20, alone >> 20, budget >> 20)


def _measure_alone() -> None:
    """The child of ``growth_alone``: build and warm the version from stdin, print the resident memory grown."""
    request: ProbeRequest = pickle.loads(sys.stdin.buffer.read())
    before = rss_bytes()
    runtime = OnnxModel(request.model, external=request.external or None, label=request.label,
                        **request.runtime_options)   # type: ignore[arg-type]
    if request.warm:
        warmup(request.spec, runtime, Path(request.model_dir), request.max_elements)   # type: ignore[arg-type]
    print(rss_bytes() - before, flush=True)


def check_static_sizes(model: Any, name: str, budget: int) -> None:
    """Refuse a graph that computes a tensor of a known shape beyond the budget (an 8 KB file whose
    ConstantOfShape makes 1.6 GB, as the budget's default is max(1 GiB, 8 x the model's bytes)), before
    onnxruntime folds it into memory."""
    import onnx

    from foldserve.datatypes import lookup

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference gives up on some valid graphs: onnxruntime still checks them
        return
    for vi in (*inferred.graph.value_info, *inferred.graph.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims or min(dims) < 0:
            continue
        try:
            dtype = lookup(t.elem_type, "onnx").numpy
        except FoldserveError:
            continue
        itemsize = dtype.itemsize if dtype is not None else 8
        size = int(np.prod(dims, dtype=np.float64)) * itemsize
        if size > budget:
            raise ModelNotReady(f"{name}: tensor {vi.name!r} of shape {dims} would take {size >> 20} MB, more "
                                f"than the {budget >> 20} MB a load may cost ({flag('max_model_memory_mb')})")


def check_batch_bound(spec: ModelSpec, max_elements: int) -> None:
    """A max_batch_size whose full batch no request could carry (more elements than --max-elements)."""
    if spec.max_batch_size <= 0:
        return
    for t in spec.inputs:
        if any(d < 0 for d in t.dims):
            continue
        n = spec.max_batch_size * int(np.prod(t.dims, dtype=np.float64))
        if n > max_elements:
            raise ModelNotReady(f"max_batch_size {spec.max_batch_size} makes input {t.name!r} {n} elements at a full "
                                f"batch, more than {flag('max_elements')} {max_elements}: lower max_batch_size")


def check_spec_matches_model(spec: ModelSpec, runtime: OnnxModel) -> None:
    names = {t.name for t in runtime.inputs} | set(runtime.defaults)
    for t in spec.inputs:
        if t.optional and t.name not in runtime.defaults:
            raise ModelNotReady(f"config.pbtxt input {t.name!r} is optional, but the ONNX model needs it (a default "
                                f"is an initializer of the same name, listed among the graph's inputs)")
    scalars = {m.name for m in runtime.inputs + runtime.outputs if m.dims == ()}
    for t in [t for t in spec.inputs + spec.outputs if t.name in scalars]:
        if spec.max_batch_size > 0 or list(t.dims) != [1] * len(t.dims) or not t.dims:
            raise ModelNotReady(f"config.pbtxt {t.name!r}: the ONNX model's {t.name!r} is a scalar (no shape), so its "
                                f"dims must hold one element (dims: [1]) and max_batch_size must be 0; got dims "
                                f"{list(t.dims)}, max_batch_size {spec.max_batch_size}")
    runtime.scalar_shapes = {t.name: tuple(t.dims) for t in spec.outputs
                             if any(m.name == t.name and m.dims == () for m in runtime.outputs)}
    for t in spec.inputs:
        if t.name not in names:
            raise ModelNotReady(f"config.pbtxt input {t.name!r} is not an input of the ONNX model ({sorted(names)})")
        try:
            numpy_dtype(t.datatype, f"config.pbtxt input {t.name!r}")
        except UnsupportedDataType as exc:
            raise ModelNotReady(str(exc)) from None
    outs = {t.name for t in runtime.outputs}
    for t in spec.outputs:
        if t.name not in outs:
            raise ModelNotReady(f"config.pbtxt output {t.name!r} is not an output of the ONNX model ({sorted(outs)})")


def warmup(spec: ModelSpec, runtime: OnnxModel, model_dir: Path, max_elements: int = 1 << 62) -> float:
    """Run the config's ``model_warmup`` entries (Triton's model warm-up: batch size, zero / random / file
    inputs, count) before the version is served; a failing entry fails the load. Without entries, one
    batch-1 run of zeros. Returns the per-sample run time of the fastest batch-1 run (seconds), which lets
    the scheduler run tiny requests inline."""
    entries = list(spec.config.model_warmup) if spec.config is not None else []
    t0 = time.perf_counter()
    best = float("inf")
    if not entries:
        try:
            return _timed_runs(runtime, _zero_feeds(spec), 1, 1)
        except Exception as exc:  # undeclared: a model that rejects zeros can still serve
            logger.warning("warm-up of %s with zeros failed (%s); declare model_warmup in config.pbtxt",
                           spec.name, first_line(exc, 200))
            return best
    rng = np.random.default_rng(0)
    for w in entries:
        try:
            feeds = _warmup_feeds(spec, w, model_dir, rng, max_elements)
            per_sample = _timed_runs(runtime, feeds, max(1, w.count), max(1, w.batch_size))
        except ModelNotReady:
            raise
        except Exception as exc:
            raise ModelNotReady(f"model_warmup {w.name!r} failed: {first_line(exc, 200)}") from None
        if w.batch_size <= 1:
            best = min(best, per_sample)
    logger.info("warmed up %s (%s) in %.2f s", spec.name, ", ".join(f"{w.name} x{max(1, w.count)}" for w in entries),
                time.perf_counter() - t0)
    return best


def _timed_runs(runtime: OnnxModel, feeds: dict[str, np.ndarray], count: int, batch: int) -> float:
    timings = []
    for _ in range(count):
        t = time.perf_counter()
        runtime.run(feeds)
        timings.append(time.perf_counter() - t)
    return min(timings) / batch


def _zero_feeds(spec: ModelSpec) -> dict[str, np.ndarray]:
    lead = [1] if spec.max_batch_size > 0 else []
    return {t.name: _zeros(lead + [d if d > 0 else 1 for d in t.dims], t.datatype) for t in spec.inputs}


def _zeros(shape: list[int], datatype: str) -> np.ndarray:
    """A zero input: empty strings for BYTES."""
    if datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=numpy_dtype(datatype))


def _warmup_feeds(spec: ModelSpec, w: Any, model_dir: Path, rng: np.random.Generator,
                  max_elements: int = 1 << 62) -> dict[str, np.ndarray]:
    """One warm-up entry's inputs, checked against the model like a request (sizes too, before allocating)."""
    where = f"model_warmup {w.name!r}"
    if spec.max_batch_size > 0 and not 1 <= w.batch_size <= spec.max_batch_size:
        raise ModelNotReady(f"{where}: batch_size {w.batch_size} must be 1..max_batch_size {spec.max_batch_size}")
    if sorted(w.inputs) != sorted(t.name for t in spec.inputs):
        raise ModelNotReady(f"{where}: inputs {sorted(w.inputs)} differ from the model's "
                            f"{sorted(t.name for t in spec.inputs)}")
    feeds = {}
    for t in spec.inputs:
        item = w.inputs[t.name]
        dtype = numpy_dtype(t.datatype)
        dims = [int(d) for d in item.dims]
        want = lookup(t.datatype, "v2", f"input {t.name!r}").config
        if (mc.DataType.Name(item.data_type) != want or len(dims) != len(t.dims)
                or any(d < 1 or (m >= 0 and d != m) for d, m in zip(dims, t.dims, strict=False))):
            raise ModelNotReady(f"{where}: input {t.name!r} is {mc.DataType.Name(item.data_type)} {dims}, "
                                f"the model's is {want} {list(t.dims)}")
        shape = ([w.batch_size] if spec.max_batch_size > 0 else []) + dims
        n_elements = int(np.prod(shape, dtype=np.float64))
        if n_elements > max_elements:
            raise ModelNotReady(f"{where}: input {t.name!r} of shape {shape} has {n_elements} elements, more than "
                                f"{flag('max_elements')} {max_elements}")
        kind = item.WhichOneof("input_data_type")
        if kind == "input_data_file":
            name = item.input_data_file
            path = model_dir / "warmup" / name
            if "/" in name or name in ("", ".", "..") or not path.is_file():
                raise ModelNotReady(f"{where}: input {t.name!r}: no file {name!r} in the model's warmup/ folder")
            if model_dir.resolve() not in path.resolve().parents:
                raise ModelNotReady(f"{where}: input {t.name!r}: {name!r} leads outside the model folder (a symbolic "
                                    f"link); refusing to read it")
            data = path.read_bytes()
            if t.datatype == "BYTES":
                try:
                    items = deserialize_bytes(data, int(np.prod(shape)), f"{where}: warmup/{name}")
                    feeds[t.name] = string_array(list(items), shape, f"{where}: warmup/{name}")
                except UnsupportedDataType as exc:
                    raise ModelNotReady(str(exc)) from None
                continue
            n = int(np.prod(shape)) * dtype.itemsize
            if len(data) != n:
                raise ModelNotReady(f"{where}: warmup/{name} has {len(data)} bytes, input {t.name!r} needs {n}")
            feeds[t.name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        elif kind == "random_data" and dtype.kind == "f":
            feeds[t.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        else:  # zero_data, or random data for a non-float input (Triton fills those with zeros too)
            feeds[t.name] = _zeros(shape, t.datatype)
    return feeds


if __name__ == "__main__":   # growth_alone's child process
    logging.disable(logging.CRITICAL)
    try:
        _measure_alone()
    except ModelNotReady as exc:
        print(f"ModelNotReady: {exc}", file=sys.stderr)
        sys.exit(3)
