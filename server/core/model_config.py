"""From a model's ``config.pbtxt`` (read by :mod:`foldserve.model_config`) to the :class:`ModelSpec` the
core serves: checks that the server can serve it, auto-completion of inputs/outputs from the ONNX
session (as Triton's auto-complete does), the version policy.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from foldserve.datatypes import lookup
from foldserve.errors import FoldserveError, InvalidInput, ModelNotReady
from foldserve.model_config import BACKEND, PLATFORM, ModelConfig, TensorSpec, read_config, tensors
from foldserve.protocol import model_config_pb2 as mc
from server.core.types import BatchingSpec, ModelSpec
from server.settings import flag

logger = logging.getLogger(__name__)


def read_servable_config(model_dir: Path) -> ModelConfig:
    """The config, checked for what this server can serve; every problem is a :class:`ModelNotReady`."""
    try:
        config = read_config(model_dir)
    except FoldserveError as exc:
        raise ModelNotReady(str(exc)) from None
    where = f"{model_dir.name}/config.pbtxt"
    if config.name != model_dir.name:
        raise ModelNotReady(f"{where}: config name {config.name!r} does not match its folder {model_dir.name!r}")
    if (config.platform and config.platform != PLATFORM) or (config.backend and config.backend != BACKEND):
        raise ModelNotReady(f"{where}: platform {config.platform or config.backend!r} is not supported "
                            f"(foldserve serves {PLATFORM} models)")
    for warning in check_fields(config, where):
        logger.warning("%s", warning)
    return config


#: ModelConfig fields foldserve does not implement and cannot serve without being wrong: refused, named
REFUSED = {"sequence_batching": "stateful sequence batching", "ensemble_scheduling": "ensembles",
           "batch_input": "batch inputs (ragged batching)", "batch_output": "batch outputs (ragged batching)"}
#: fields whose absence of effect changes no answer: the model loads, with a warning naming each
IGNORED = {"optimization": "backend optimisation settings (onnxruntime applies all its graph optimisations)",
           "cc_model_filenames": "per-GPU model files", "metric_tags": "metric tags",
           "model_operations": "model operations", "model_repository_agents": "repository agents",
           "response_cache": "the response cache (every request is computed)", "model_metrics": "model metrics"}
TENSOR_REFUSED = {"reshape": "reshape", "is_shape_tensor": "shape tensors", "allow_ragged_batch": "ragged batches"}
#: bounds on what a config may ask for: beyond them a model loads but cannot serve (20,000 instances made most
#: requests 429; a queue delay of 2^64-1 us made every request wait forever)
MAX_INSTANCES = 64
MAX_QUEUE_DELAY_US = 60_000_000
INSTANCE_IGNORED = ("kind", "gpus", "secondary_devices", "profile", "passive", "host_policy", "rate_limiter")


def check_fields(config: ModelConfig, where: str) -> list[str]:
    """Every field of Triton's ModelConfig parses; this says what foldserve does with the ones it does not
    implement: raises :class:`ModelNotReady` naming the first it would have to get wrong, returns a warning per
    field it ignores."""
    set_fields = {f.name for f, _ in config.ListFields()}
    for name, what in REFUSED.items():
        if name in set_fields:
            raise ModelNotReady(f"{where}: {name} ({what}) is not supported by foldserve")
    if config.model_transaction_policy.decoupled:
        raise ModelNotReady(f"{where}: model_transaction_policy.decoupled (several responses per request) is not "
                            f"supported by foldserve")
    for side, items in (("input", config.input), ("output", config.output)):
        for t in items:
            present = {f.name for f, _ in t.ListFields()}
            for field_name, what in TENSOR_REFUSED.items():
                if field_name in present:
                    raise ModelNotReady(f"{where}: {side} {t.name!r}: {field_name} ({what}) is not supported by "
                                        f"foldserve")
    if config.default_model_filename not in ("", "model.onnx"):
        raise ModelNotReady(f"{where}: default_model_filename {config.default_model_filename!r}: foldserve serves "
                            f"each version's model.onnx (written by foldserve fold)")
    if config.dynamic_batching.priority_queue_policy:
        raise ModelNotReady(f"{where}: dynamic_batching.priority_queue_policy (a queue policy per priority level) "
                            f"is not supported; default_queue_policy applies to every level")
    warnings = [f"{where}: {name} ({what}) is ignored" for name, what in IGNORED.items() if name in set_fields]
    for group in config.instance_group:
        present = {f.name for f, _ in group.ListFields()}
        ignored = [n for n in INSTANCE_IGNORED if n in present]
        if ignored:
            warnings.append(f"{where}: instance_group {', '.join(ignored)} ignored (the provider is chosen by "
                            f"{flag('provider')}; count sets the model's parallel executions)")
    count = sum(max(g.count, 1) for g in config.instance_group)
    if count > MAX_INSTANCES:
        raise ModelNotReady(f"{where}: instance_group count {count} is more than the {MAX_INSTANCES} parallel "
                            f"executions foldserve runs per model")
    delay = int(config.dynamic_batching.max_queue_delay_microseconds)
    if delay > MAX_QUEUE_DELAY_US:
        raise ModelNotReady(f"{where}: dynamic_batching.max_queue_delay_microseconds {delay} is more than "
                            f"{MAX_QUEUE_DELAY_US} (60 s): every request would wait that long for a batch")
    if config.runtime not in ("", "onnxruntime", "libtriton_onnxruntime.so"):
        warnings.append(f"{where}: runtime {config.runtime!r} ignored (onnxruntime serves every model)")
    return warnings


def override_config(disk: ModelConfig, text: str, name: str) -> ModelConfig:
    """Triton's load with a config override (``load_model(name, config=JSON)``): the JSON is a whole ModelConfig
    that replaces ``config.pbtxt`` until the next plain load. Checked like a config from disk, and it may not
    change the verified interface: inputs and outputs (where it names them) and whether the model batches.
    Errors are 400s that say "failed to load" (Triton's words) and name what is wrong."""
    from google.protobuf import json_format

    head = f"failed to load {name!r}: config override"
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"{head}: expected a ModelConfig as a JSON string")
    config = ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise InvalidInput(f"{head} is not a ModelConfig in JSON: {str(exc).splitlines()[0][:300]}") from None
    if config.name and config.name != name:
        raise InvalidInput(f"{head} names model {config.name!r}")
    config.name = name
    if (config.platform and config.platform != PLATFORM) or (config.backend and config.backend != BACKEND):
        raise InvalidInput(f"{head}: platform {config.platform or config.backend!r} is not supported (foldserve "
                           f"serves {PLATFORM} models)")
    if (config.max_batch_size > 0) != (disk.max_batch_size > 0):
        raise InvalidInput(f"{head} changes the verified interface: max_batch_size {config.max_batch_size} "
                           f"{'adds' if config.max_batch_size > 0 else 'removes'} the batch axis of "
                           f"config.pbtxt's max_batch_size {disk.max_batch_size}")
    for side, mine, theirs in (("inputs", config.input, disk.input), ("outputs", config.output, disk.output)):
        if len(mine) and len(theirs) and tensors(mine, side) != tensors(theirs, side):
            raise InvalidInput(f"{head} changes the verified interface: its {side} "
                               f"{[(t.name, t.datatype, list(t.dims)) for t in tensors(mine, side)]} differ from "
                               f"config.pbtxt's {[(t.name, t.datatype, list(t.dims)) for t in tensors(theirs, side)]}")
    try:
        for warning in check_fields(config, head):
            logger.warning("%s", warning)
    except ModelNotReady as exc:
        raise InvalidInput(str(exc)) from None
    for key, value in disk.parameters.items():       # foldserve's own records (precision, ...) stay
        if key.startswith("foldserve_") and key not in config.parameters:
            config.parameters[key].CopyFrom(value)
    return config


def complete_config(config: ModelConfig, session_inputs: list[TensorSpec], session_outputs: list[TensorSpec]) -> None:
    """Fill absent inputs/outputs from the ONNX session (full shapes, -1 for dynamic dims)."""
    batched = config.max_batch_size > 0
    for target, specs in ((config.input, session_inputs), (config.output, session_outputs)):
        if len(target):
            continue
        for spec in specs:
            t = target.add(name=spec.name)
            t.data_type = mc.DataType.Value(lookup(spec.datatype).config)
            t.dims.extend(spec.dims[1:] if batched else spec.dims or (1,))   # a scalar is served as [1] (Triton)
    if not config.platform and not config.backend:
        config.platform = PLATFORM


def version_policy(config: ModelConfig) -> dict[str, Any]:
    which = config.version_policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if which == "all":
        return {"all": {}}
    if which == "specific":
        return {"specific": {"versions": [int(v) for v in config.version_policy.specific.versions]}}
    n = config.version_policy.latest.num_versions if which == "latest" else 1
    return {"latest": {"num_versions": max(1, n)}}


def to_spec(config: ModelConfig, labels: list[str], instances_override: int = 0) -> ModelSpec:
    try:
        inputs, outputs = tensors(config.input, "input"), tensors(config.output, "output")
    except FoldserveError as exc:
        raise ModelNotReady(f"{config.name}/config.pbtxt: {exc}") from None
    batching = None
    if config.HasField("dynamic_batching") and config.max_batch_size > 0:
        db = config.dynamic_batching
        policy = db.default_queue_policy
        levels, default_level = int(db.priority_levels), int(db.default_priority_level)
        if levels and not 1 <= default_level <= levels:
            raise ModelNotReady(f"{config.name}/config.pbtxt: dynamic_batching.default_priority_level "
                                f"{default_level} must be between 1 and priority_levels {levels}")
        batching = BatchingSpec(int(db.max_queue_delay_microseconds), int(policy.max_queue_size),
                                int(policy.default_timeout_microseconds),
                                mc.ModelQueuePolicy.TimeoutAction.Name(policy.timeout_action),
                                bool(policy.allow_timeout_override), levels, default_level)
    instances = instances_override or sum(max(g.count, 1) for g in config.instance_group) or 1
    return ModelSpec(
        name=config.name, platform=config.platform or PLATFORM, max_batch_size=int(config.max_batch_size),
        inputs=inputs, outputs=outputs, batching=batching, version_policy=version_policy(config),
        instances=instances, labels=labels,
        parameters={k: v.string_value for k, v in config.parameters.items()},
        config=config,
    )


def select_versions(available: list[int], policy: dict[str, Any]) -> list[int]:
    available = sorted(available)
    if "all" in policy:
        return available
    if "specific" in policy:
        wanted = set(policy["specific"]["versions"])
        return [v for v in available if v in wanted]
    n = policy.get("latest", {}).get("num_versions", 1)
    return available[-n:]
