"""onnxruntime sessions: provider choice (CUDA when a GPU is really present), threads, IO binding.

:class:`OnnxModel` is how the server runs a model, and the verifier runs the served file through the same
class, so "verified" means verified as served.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foldserve.datatypes import lookup
from foldserve.errors import FoldserveError, ModelNotReady
from foldserve.model_config import TensorSpec
from foldserve.records import first_line
from server.core.strings import as_latin1, from_latin1
from server.settings import flag

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """CUDA devices visible to the driver (0 without a driver): onnxruntime-gpu lists the CUDA provider
    even on machines with no GPU, so its provider list alone cannot decide."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def cuda_problem(device_id: int = 0) -> str | None:
    """Why the CUDA provider cannot run here (no CUDA build of onnxruntime, no device, no such device), or None."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    count = gpu_count()
    if count == 0:
        return "no CUDA device is visible"
    if device_id >= count:
        return f"{flag('device_id')} {device_id}, but {count} CUDA device(s) are visible"
    return None


def choose_providers(provider: str, device_id: int) -> list[Any]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "cuda" or (provider == "auto" and gpu_count() > 0 and "CUDAExecutionProvider" in available):
        if "CUDAExecutionProvider" not in available:
            raise ModelNotReady("provider 'cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                                "(install onnxruntime-gpu)")
        if gpu_count() == 0:
            raise ModelNotReady("provider 'cuda' requested but no CUDA device is visible")
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def _tensor_specs(args: Any, what: str) -> list[TensorSpec]:
    specs = []
    for a in args:
        try:
            datatype = lookup(a.type, "ort", f"{what} {a.name!r}").v2
        except FoldserveError as exc:
            raise ModelNotReady(str(exc)) from None
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in a.shape)
        specs.append(TensorSpec(a.name, datatype, dims))
    return specs


class OnnxModel:
    """One loaded ONNX model: ``run(feeds)`` returns the outputs as numpy arrays on the host.

    ``optimization`` is the graph optimisation level (the server uses "all"; the verifier runs unfolded
    references with "disable" so that onnxruntime's own Conv+BN fusion cannot hide anything).
    """

    def __init__(self, path: Path | bytes, *, provider: str = "auto", device_id: int = 0, intra_op_threads: int = 0,
                 inter_op_threads: int = 0, io_binding: bool = True, spin: bool = True,
                 optimization: str = "all", external: dict[str, bytes] | None = None, label: str = "") -> None:
        import onnxruntime as ort

        if provider in ("auto", "cuda") and gpu_count() > 0:
            try:  # CUDA libraries from pip packages (nvidia-*), if present
                ort.preload_dlls()
            except Exception:
                pass
        opts = ort.SessionOptions()
        levels = dict(zip(OPTIMIZATION_LEVELS, (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                                ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                                ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                                ort.GraphOptimizationLevel.ORT_ENABLE_ALL), strict=False))
        opts.graph_optimization_level = levels[optimization]
        opts.log_severity_level = 3
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        if inter_op_threads:
            opts.inter_op_num_threads = inter_op_threads
        if spin:    # within a run only: idle threads that spin on between runs take the CPU the front end needs
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        else:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if external:   # the model's external data, as read (and hashed) by the loader: onnxruntime opens no file
            self._external = [np.frombuffer(b, np.uint8) for b in external.values()]
            opts.add_external_initializers_from_files_in_memory(list(external), self._external,
                                                                [len(b) for b in external.values()])
        providers = choose_providers(provider, device_id)
        label = label or ("model" if isinstance(path, bytes) else Path(path).name)
        try:
            self.session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=opts,
                                                providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelNotReady(f"{label}: onnxruntime cannot load it ({type(exc).__name__}: "
                                f"{first_line(exc, 300)})") from None
        self.provider = self.session.get_providers()[0]
        self.device_id = device_id
        self.use_binding = io_binding and self.provider == "CUDAExecutionProvider"
        self.inputs = _tensor_specs(self.session.get_inputs(), "input")
        # inputs with a default (an initializer listed among the graph's inputs): not offered unless a config
        # declares them (as Triton's auto-complete), and a request may leave out those declared optional
        self.defaults = {t.name: t for t in _tensor_specs(self.session.get_overridable_initializers(), "input")}
        self.outputs = _tensor_specs(self.session.get_outputs(), "output")
        self.output_names = [o.name for o in self.outputs]
        # scalars (inputs and outputs without a shape, or of rank 0) are served with dims [1] as Triton does: a
        # one-element input is fed as a scalar, a scalar output takes the config's one-element dims
        self.scalar_inputs = {t.name for t in self.inputs if t.dims == ()}
        self.scalar_shapes: dict[str, tuple[int, ...]] = {}
        self.opaque_strings = False     # string elements travel as Latin-1 (any bytes; see strings.py)
        logger.info("loaded %s on %s", label, self.provider)

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(output_names or self.output_names)
        if self.scalar_inputs:
            feeds = {k: v.reshape(()) if k in self.scalar_inputs and v.size == 1 else v for k, v in feeds.items()}
        if self.opaque_strings:
            feeds = {k: as_latin1(v) if v.dtype == object else v for k, v in feeds.items()}
        if not self.use_binding:
            out: list[np.ndarray] = self.session.run(names, feeds)
            return self._shaped(names, out) if self.scalar_shapes or self.opaque_strings else out
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        copied: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return self._shaped(names, copied) if self.scalar_shapes or self.opaque_strings else copied

    def _shaped(self, names: list[str], arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.opaque_strings:
            arrays = [from_latin1(a) if a.dtype == object else a for a in arrays]
        return [a.reshape(self.scalar_shapes[n]) if a.ndim == 0 and n in self.scalar_shapes else a
                for n, a in zip(names, arrays, strict=True)]

