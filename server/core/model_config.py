"""Read a model's ``config.pbtxt`` (Triton's format) into a :class:`ModelSpec`.

The text format is parsed with protobuf against our copy of Triton's ModelConfig message; the core only
ever sees the resulting :class:`ModelSpec` and the config's JSON form (for the config endpoints).
Inputs and outputs missing from the file are completed from the ONNX model, as Triton's auto-complete
does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format

from foldserve.errors import ModelNotReady
from server.core.datatypes import CONFIG_TO_V2, V2_TO_CONFIG
from server.core.types import BatchingSpec, ModelSpec, TensorSpec
from server.protocol import model_config_pb2


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    path = model_dir / "config.pbtxt"
    config = model_config_pb2.ModelConfig()
    if path.is_file():
        try:
            text_format.Parse(path.read_text(), config)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise ModelNotReady(f"{path}: invalid config.pbtxt ({exc})") from None
    if not config.name:
        config.name = model_dir.name
    if config.name != model_dir.name:
        raise ModelNotReady(f"{path}: config name {config.name!r} does not match its folder {model_dir.name!r}")
    if config.platform and config.platform != "onnxruntime_onnx" or config.backend and config.backend != "onnxruntime":
        raise ModelNotReady(f"{path}: platform {config.platform or config.backend!r} is not supported "
                            f"(foldserve serves onnxruntime_onnx models)")
    return config


def complete_config(config: model_config_pb2.ModelConfig, session_inputs: list[tuple[str, str, list]],
                    session_outputs: list[tuple[str, str, list]]) -> None:
    """Fill inputs/outputs from the ONNX session (name, v2 datatype, shape with None for dynamic)."""
    batched = config.max_batch_size > 0
    for target, tensors in ((config.input, session_inputs), (config.output, session_outputs)):
        if len(target):
            continue
        for name, datatype, shape in tensors:
            t = target.add()
            t.name = name
            t.data_type = model_config_pb2.DataType.Value(V2_TO_CONFIG[datatype])
            dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
            t.dims.extend(dims[1:] if batched else dims)
    if not config.platform and not config.backend:
        config.platform = "onnxruntime_onnx"


def to_spec(config: model_config_pb2.ModelConfig, labels: list[str], instances_override: int = 0) -> ModelSpec:
    def tensors(items) -> list[TensorSpec]:
        out = []
        for t in items:
            enum_name = model_config_pb2.DataType.Name(t.data_type)
            out.append(TensorSpec(t.name, CONFIG_TO_V2.get(enum_name, "FP32"), [int(d) for d in t.dims]))
        return out

    batching = None
    if config.HasField("dynamic_batching") and config.max_batch_size > 0:
        db = config.dynamic_batching
        batching = BatchingSpec(list(db.preferred_batch_size), int(db.max_queue_delay_microseconds))
    policy: dict[str, Any] = {"latest": {"num_versions": 1}}
    which = config.version_policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if which == "latest":
        policy = {"latest": {"num_versions": max(1, config.version_policy.latest.num_versions)}}
    elif which == "all":
        policy = {"all": {}}
    elif which == "specific":
        policy = {"specific": {"versions": [int(v) for v in config.version_policy.specific.versions]}}
    instances = instances_override or sum(max(g.count, 1) for g in config.instance_group) or 1
    return ModelSpec(
        name=config.name, platform=config.platform or "onnxruntime_onnx", max_batch_size=int(config.max_batch_size),
        inputs=tensors(config.input), outputs=tensors(config.output), batching=batching, version_policy=policy,
        instances=instances, labels=labels,
        parameters={k: v.string_value for k, v in config.parameters.items()},
        config=json_format.MessageToDict(config, preserving_proto_field_name=True),
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
