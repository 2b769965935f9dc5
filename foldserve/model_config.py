"""``config.pbtxt`` (Triton's model configuration) read and written through the ModelConfig message.

The file is protobuf text format: it is parsed with ``text_format.Parse`` into our copy of Triton's
``inference.ModelConfig`` and written with ``text_format.MessageToString``, never templated by hand.
:class:`TensorSpec` is the description of one input or output both stages agree on.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from foldserve.atomic import write_text
from foldserve.datatypes import lookup
from foldserve.errors import EntryError
from foldserve.protocol import model_config_pb2 as mc

ModelConfig = mc.ModelConfig
CONFIG_FILE = "config.pbtxt"
PLATFORM, BACKEND = "onnxruntime_onnx", "onnxruntime"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: v2 datatype and per-sample dims (no batch axis when max_batch_size > 0; -1: any)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False          # an input a request may leave out (the model has a default for it)

    def full_shape(self, max_batch_size: int) -> list[int]:
        return ([-1] if max_batch_size > 0 else []) + list(self.dims)


def parse_config(text: str, where: str = CONFIG_FILE) -> ModelConfig:
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise EntryError(f"{where}: invalid config.pbtxt ({exc})") from None
    return config


def read_config(model_dir: Path) -> ModelConfig:
    """``MODEL_DIR/config.pbtxt``; an absent file reads as an empty config named after the folder."""
    path = Path(model_dir) / CONFIG_FILE
    config = ModelConfig()
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise EntryError(f"{model_dir.name}/{CONFIG_FILE}: unreadable ({exc})") from None
        config = parse_config(text, f"{model_dir.name}/{CONFIG_FILE}")
    if not config.name:
        config.name = model_dir.name
    return config


def config_text(config: ModelConfig) -> str:
    return str(text_format.MessageToString(config, use_short_repeated_primitives=True))


def write_config(model_dir: Path, config: ModelConfig) -> Path:
    path = Path(model_dir) / CONFIG_FILE
    write_text(path, config_text(config))
    return path


def tensors(items: Iterable[mc.ModelInput | mc.ModelOutput], where: str) -> list[TensorSpec]:
    """The config's inputs or outputs as TensorSpecs (an unknown data_type is an error, not FP32)."""
    out = []
    for t in items:
        enum_name = mc.DataType.Name(t.data_type)
        dtype = lookup(enum_name, "config", f"{where} {t.name!r}")
        out.append(TensorSpec(t.name, dtype.v2, tuple(int(d) for d in t.dims),
                              bool(getattr(t, "optional", False))))
    return out


def make_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], *, max_batch_size: int,
                max_queue_delay_us: int | None = None, label_output: str | None = None,
                parameters: dict[str, str] | None = None) -> ModelConfig:
    """A config for an onnxruntime model with a dynamic batch axis (when max_batch_size > 0), dynamic
    batching, the latest version served and one instance."""
    config = ModelConfig(name=name, platform=PLATFORM, backend=BACKEND, max_batch_size=max_batch_size)
    for spec, target in [(t, config.input) for t in inputs] + [(t, config.output) for t in outputs]:
        item = target.add(name=spec.name, dims=list(spec.dims))
        item.data_type = mc.DataType.Value(lookup(spec.datatype, "v2", f"tensor {spec.name!r}").config)
        if label_output is not None and spec.name == label_output and target is config.output:
            item.label_filename = "labels.txt"
    if max_queue_delay_us is not None and max_batch_size > 1:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(b for b in (4, 8, 16, 32, 64) if b <= max_batch_size)
    config.version_policy.latest.num_versions = 1
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    add_default_warmup(config)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def add_default_warmup(config: ModelConfig) -> None:
    """Triton's ``model_warmup``: random inputs at batch 1 (three runs: the server times the last ones) and,
    for a batching model, at max_batch_size. Nothing when an input has a variable dimension (the file
    cannot say what to send)."""
    if any(d < 0 for t in config.input for d in t.dims):
        return
    sizes = [1] + ([config.max_batch_size] if config.max_batch_size > 1 else [])
    for b, count in zip(sizes, (3, 1), strict=False):
        w = config.model_warmup.add(name=f"random batch {b}", batch_size=b if config.max_batch_size > 0 else 0,
                                    count=count)
        for t in config.input:
            w.inputs[t.name].data_type = t.data_type
            w.inputs[t.name].dims.extend(t.dims)
            if t.data_type in (mc.TYPE_FP16, mc.TYPE_FP32, mc.TYPE_FP64, mc.TYPE_BF16):
                w.inputs[t.name].random_data = True
            else:  # random integers could be out of an index input's range
                w.inputs[t.name].zero_data = True


#: what a client relies on: (max_batch_size, inputs, outputs)
Interface = tuple[int, list[TensorSpec], list[TensorSpec]]


def interface(config: ModelConfig) -> Interface:
    """What a client of the model relies on: (max_batch_size, inputs, outputs)."""
    return (int(config.max_batch_size), tensors(config.input, "input"), tensors(config.output, "output"))
