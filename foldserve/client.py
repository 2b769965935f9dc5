"""The one KServe v2 client foldserve uses (CLI ``infer``, live verification, benchmarks), over gRPC with
our stubs or HTTP with the standard library and Triton's binary tensor extension.

Transport errors are mapped to the error hierarchy here and nowhere else: a gRPC status or an HTTP status
becomes the :class:`~foldserve.errors.FoldserveError` subclass the server raised, and a server that does not
answer at all becomes :class:`~foldserve.errors.ServerUnreachable` (exit code 2, on both transports).
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from foldserve.datatypes import deserialize_bytes, lookup, raw_bytes
from foldserve.errors import BY_GRPC_STATUS, BY_HTTP_STATUS, FoldserveError, ServerUnreachable
from foldserve.metadata import ModelMetadata, TensorMetadata

HEADER_LENGTH = "Inference-Header-Content-Length"


def _error(status: str | int, message: str, address: str) -> FoldserveError:
    cls = (BY_GRPC_STATUS if isinstance(status, str) else BY_HTTP_STATUS).get(status, FoldserveError)  # type: ignore
    return cls(f"server {address}: {message or status}")


def _as_array(datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return np.array(deserialize_bytes(raw), dtype=object).reshape(shape)
    return np.frombuffer(raw, dtype=lookup(datatype).numpy).reshape(shape)


def _datatype(arr: np.ndarray, datatype: str | None) -> str:
    return datatype or lookup(arr.dtype, "numpy", "input array").v2


# --- request builders (also used by the benchmark to pre-serialise payloads) -------------------------------

def grpc_infer_request(model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
                       datatypes: Mapping[str, str] | None = None, outputs: Sequence[str] = (),
                       classification: int = 0, request_id: str = "") -> Any:
    from foldserve.protocol import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, arr in inputs.items():
        dt = _datatype(arr, (datatypes or {}).get(name))
        req.inputs.add(name=name, datatype=dt, shape=list(arr.shape))
        req.raw_input_contents.append(raw_bytes(dt, arr))
    for name in outputs:
        o = req.outputs.add(name=name)
        if classification:
            o.parameters["classification"].int64_param = classification
    return req


def http_infer_body(inputs: Mapping[str, np.ndarray], *, datatypes: Mapping[str, str] | None = None,
                    outputs: Sequence[str] = (), classification: int = 0, binary_output: bool = True,
                    request_id: str = "") -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a v2 REST inference request with binary inputs."""
    doc: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": binary_output}}
    if request_id:
        doc["id"] = request_id
    blobs = []
    for name, arr in inputs.items():
        dt = _datatype(arr, (datatypes or {}).get(name))
        blob = raw_bytes(dt, arr)
        blobs.append(blob)
        doc["inputs"].append({"name": name, "datatype": dt, "shape": list(arr.shape),
                              "parameters": {"binary_data_size": len(blob)}})
    if outputs:
        doc["outputs"] = [{"name": n, "parameters": ({"classification": classification} if classification else
                                                     {"binary_data": binary_output})} for n in outputs]
    header = json.dumps(doc).encode()
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


# --- clients --------------------------------------------------------------------------------------------

class GrpcClient:
    """Blocking v2 client over gRPC."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 60.0) -> None:
        import grpc

        from foldserve.protocol import grpc_service_pb2 as pb
        from foldserve.protocol import grpc_service_pb2_grpc as pb_grpc

        self.address = address.removeprefix("grpc://")
        self._grpc, self._pb = grpc, pb
        self._channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", -1),
                                                                     ("grpc.max_send_message_length", -1)])
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._md = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout
        self._connected = False

    def _call(self, method: str, request: Any) -> Any:
        grpc = self._grpc
        if not self._connected:
            self._wait_ready(min(self.timeout, 10.0))
            self._connected = True
        try:
            return getattr(self._stub, method)(request, metadata=self._md, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc.code().name, exc.details() or "", self.address) from None

    def _wait_ready(self, timeout: float) -> None:
        """Until the channel is ready; an HTTP/1 server on that port is named at its first refusal (a gRPC
        client aimed at the REST port), anything else after ``timeout``."""
        import threading

        grpc = self._grpc
        changed, state = threading.Event(), [None]

        def seen(s: Any) -> None:
            state[0] = s
            changed.set()

        self._channel.subscribe(seen, try_to_connect=True)
        deadline = time.monotonic() + timeout
        try:
            probed = False
            while state[0] != grpc.ChannelConnectivity.READY and time.monotonic() < deadline:
                changed.wait(max(0.0, deadline - time.monotonic()))
                changed.clear()
                if state[0] == grpc.ChannelConnectivity.TRANSIENT_FAILURE and not probed:
                    probed = True
                    if _speaks_http(self.address):
                        raise ServerUnreachable(f"{self.address} is an HTTP port (it answers HTTP/1.1, not gRPC): "
                                                f"use http://{self.address}, or the server's gRPC port")
        finally:
            self._channel.unsubscribe(seen)
        if state[0] != grpc.ChannelConnectivity.READY:
            raise ServerUnreachable(f"cannot reach a gRPC server at {self.address}")

    def metadata(self, model: str, version: str = "") -> ModelMetadata:
        r = self._call("ModelMetadata", self._pb.ModelMetadataRequest(name=model, version=version))
        config_params = self.config(model, version).get("parameters") or {}
        params = {k: v.get("string_value", "") for k, v in config_params.items()}
        return ModelMetadata(r.name, list(r.versions), r.platform,
                             [TensorMetadata(t.name, t.datatype, [int(s) for s in t.shape]) for t in r.inputs],
                             [TensorMetadata(t.name, t.datatype, [int(s) for s in t.shape]) for t in r.outputs],
                             _decode_parameters(params))

    def config(self, model: str, version: str = "") -> dict[str, Any]:
        """The model's configuration in Triton's JSON form (as the HTTP endpoint gives it)."""
        from google.protobuf import json_format

        msg = self._call("ModelConfig", self._pb.ModelConfigRequest(name=model, version=version)).config
        out: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        return out

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
              datatypes: Mapping[str, str] | None = None, outputs: Sequence[str] = (),
              classification: int = 0) -> dict[str, np.ndarray]:
        req = grpc_infer_request(model, inputs, version=version, datatypes=datatypes, outputs=outputs,
                                 classification=classification)
        r = self._call("ModelInfer", req)
        return {o.name: _as_array(o.datatype, list(o.shape), raw)
                for o, raw in zip(r.outputs, r.raw_output_contents, strict=False)}

    def close(self) -> None:
        self._channel.close()


class HttpClient:
    """Blocking v2 client over HTTP (binary tensor extension both ways)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.base = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
        self.address = self.base
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None) -> tuple[bytes, Mapping[str, str]]:
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers={**self._auth, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read(), r.headers
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                msg = ""
            raise _error(exc.code, msg or f"HTTP {exc.code}", self.base) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachable(f"cannot reach an HTTP server at {self.base} ({reason})") from None

    def _json(self, method: str, path: str) -> Any:
        return json.loads(self._request(method, path)[0])

    @staticmethod
    def _path(model: str, version: str) -> str:
        from urllib.parse import quote

        return f"/v2/models/{quote(model, safe='')}" + (f"/versions/{quote(version, safe='')}" if version else "")

    def metadata(self, model: str, version: str = "") -> ModelMetadata:
        d = self._json("GET", self._path(model, version))
        cfg = self.config(model, version)
        params = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        return ModelMetadata(d["name"], list(d.get("versions", [])), d.get("platform", ""),
                             [_tensor_metadata(t) for t in d["inputs"]], [_tensor_metadata(t) for t in d["outputs"]],
                             _decode_parameters(params))

    def config(self, model: str, version: str = "") -> dict[str, Any]:
        """The model's configuration in Triton's JSON form."""
        out: dict[str, Any] = self._json("GET", self._path(model, version) + "/config")
        return out

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
              datatypes: Mapping[str, str] | None = None, outputs: Sequence[str] = (),
              classification: int = 0) -> dict[str, np.ndarray]:
        body, headers = http_infer_body(inputs, datatypes=datatypes, outputs=outputs, classification=classification)
        data, resp_headers = self._request("POST", self._path(model, version) + "/infer", body, headers)
        n = resp_headers.get(HEADER_LENGTH)
        header, blob = (data[:int(n)], memoryview(data)[int(n):]) if n is not None else (data, memoryview(b""))
        doc = json.loads(header)
        result, offset = {}, 0
        for o in doc["outputs"]:
            size = (o.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                result[o["name"]] = _as_array(o["datatype"], o["shape"], bytes(blob[offset:offset + size]))
                offset += size
            elif o["datatype"] == "BYTES":
                result[o["name"]] = np.array([str(x).encode() for x in o["data"]], dtype=object).reshape(o["shape"])
            else:
                result[o["name"]] = np.asarray(o["data"], dtype=lookup(o["datatype"]).numpy).reshape(o["shape"])
        return result

    def close(self) -> None:
        pass


def _decode_parameters(params: Mapping[str, str]) -> dict[str, Any]:
    """Config parameters whose values are JSON (foldserve's records) decoded, the rest as strings."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        try:
            out[k] = json.loads(v) if v[:1] in ("{", "[") else v
        except ValueError:
            out[k] = v
    return out


def _speaks_http(address: str, timeout: float = 2.0) -> bool:
    """Whether an HTTP/1 server answers at HOST:PORT."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: foldserve\r\nconnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.")
    except (OSError, ValueError):
        return False


def _tensor_metadata(t: dict[str, Any]) -> TensorMetadata:
    return TensorMetadata(t["name"], t["datatype"], [int(s) for s in t["shape"]])


def connect(url: str, protocol: str | None = None, token: str | None = None,
            timeout: float = 60.0) -> GrpcClient | HttpClient:
    """A client for ``url``: HOST:PORT or grpc://HOST:PORT (gRPC), http(s)://HOST:PORT (HTTP)."""
    protocol = protocol or ("http" if url.startswith(("http://", "https://")) else "grpc")
    return GrpcClient(url, token, timeout) if protocol == "grpc" else HttpClient(url, token, timeout)
