"""``foldserve infer``: a small v2 client (gRPC with our stubs, or HTTP with the standard library).

It reads the model's metadata to learn the input's name, datatype and shape, loads the file (an image is
converted to the model's channels and size; ``.npy``/``.npz`` arrays are used as they are, with a batch
axis added when missing) and asks for the top classes with the v2 classification extension.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from foldserve.errors import ConfigError, DataError, FoldserveError
from server.core.datatypes import V2_TO_NUMPY


def load_input(path: str, shape: list[int], datatype: str, key: str | None = None, scale: float = 1.0) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    dims = shape[1:] if shape and shape[0] == -1 else shape
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as f:
            if key is None and len(f.files) != 1 and "x" not in f.files:
                raise DataError(f"{path}: holds {f.files}; choose one with --key")
            arr = f[key or ("x" if "x" in f.files else f.files[0])]
    else:
        try:
            from PIL import Image

            with Image.open(p) as im:
                c, h, w = (dims + [1, 1, 1])[:3] if len(dims) == 3 else (1, *dims[-2:])
                im = im.convert("L" if c == 1 else "RGB").resize((w, h))
                arr = np.asarray(im, dtype=np.float32) * scale
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        except (OSError, ImportError) as exc:
            raise DataError(f"{path}: not a readable image or .npy/.npz ({exc})") from None
    arr = np.asarray(arr, dtype=V2_TO_NUMPY.get(datatype, np.float32))
    if list(arr.shape) == [d for d in dims]:
        arr = arr[None]
    return np.ascontiguousarray(arr)


def infer_file(url: str, model: str, path: str, *, version: str = "", protocol: str | None = None,
               key: str | None = None, top: int = 3, token: str | None = None, scale: float = 1.0) -> list[str]:
    protocol = protocol or ("http" if url.startswith(("http://", "https://")) else "grpc")
    client = GrpcClient(url, token) if protocol == "grpc" else HttpClient(url, token)
    meta = client.metadata(model, version)
    inp = meta["inputs"][0]
    out = meta["outputs"][0]
    x = load_input(path, inp["shape"], inp["datatype"], key, scale)
    results = client.classify(model, version, inp["name"], inp["datatype"], x, out["name"], top)
    lines = []
    for i, row in enumerate(results):
        lines.append(f"sample {i}:")
        for entry in row:
            score, idx, *label = entry.split(":", 2)
            lines.append(f"  {label[0] if label else idx:>12}  class {idx:>4}  score {float(score):.4f}")
    return lines


class GrpcClient:
    def __init__(self, url: str, token: str | None) -> None:
        import grpc

        from server.protocol import grpc_service_pb2 as pb
        from server.protocol import grpc_service_pb2_grpc as pb_grpc

        self.pb, self.grpc = pb, grpc
        self.stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url.removeprefix("grpc://")))
        self.md = [("authorization", f"Bearer {token}")] if token else None

    def _call(self, fn, req):
        try:
            return fn(req, metadata=self.md, timeout=60)
        except self.grpc.RpcError as exc:
            raise FoldserveError(f"{exc.code().name}: {exc.details()}") from None

    def metadata(self, model: str, version: str) -> dict:
        from google.protobuf import json_format

        r = self._call(self.stub.ModelMetadata, self.pb.ModelMetadataRequest(name=model, version=version))
        d = json_format.MessageToDict(r, preserving_proto_field_name=True)
        for t in d["inputs"] + d["outputs"]:
            t["shape"] = [int(s) for s in t["shape"]]
        return d

    def classify(self, model, version, name, datatype, x, out_name, top) -> list[list[str]]:
        pb = self.pb
        req = pb.ModelInferRequest(model_name=model, model_version=version)
        req.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        o = req.outputs.add(name=out_name)
        o.parameters["classification"].int64_param = top
        r = self._call(self.stub.ModelInfer, req)
        raw = r.raw_output_contents[0]
        items, off = [], 0
        while off < len(raw):
            n = int.from_bytes(raw[off:off + 4], "little")
            items.append(raw[off + 4:off + 4 + n].decode())
            off += 4 + n
        return [items[i:i + top] for i in range(0, len(items), top)]


class HttpClient:
    def __init__(self, url: str, token: str | None) -> None:
        self.base = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def _req(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", "")
            except ValueError:
                msg = ""
            raise FoldserveError(f"HTTP {exc.code}: {msg}") from None
        except urllib.error.URLError as exc:
            raise ConfigError(f"cannot reach {self.base}: {exc.reason}") from None

    def metadata(self, model: str, version: str) -> dict:
        return self._req("GET", f"/v2/models/{model}" + (f"/versions/{version}" if version else ""))

    def classify(self, model, version, name, datatype, x, out_name, top) -> list[list[str]]:
        body = {"inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
                "outputs": [{"name": out_name, "parameters": {"classification": top}}]}
        r = self._req("POST", f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer", body)
        data = r["outputs"][0]["data"]
        return [data[i:i + top] for i in range(0, len(data), top)]
