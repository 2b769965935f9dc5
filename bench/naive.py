"""The baseline for JSON REST: the FastAPI endpoint most people write first (pydantic parses the tensor).

Run: python -m bench.naive PORT MODEL.onnx
"""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float]


class Request(BaseModel):
    inputs: list[Tensor]


def make_app(model_path: str) -> FastAPI:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/v2/models/{model}/infer")
    def infer(model: str, req: Request) -> dict:
        t = req.inputs[0]
        x = np.array(t.data, dtype=np.float32).reshape(t.shape)
        y = session.run(None, {t.name: x})[0]
        return {"model_name": model, "outputs": [{"name": "output", "datatype": "FP32", "shape": list(y.shape),
                                                  "data": y.reshape(-1).tolist()}]}

    return app


if __name__ == "__main__":
    port, path = int(sys.argv[1]), sys.argv[2]
    print("ready", flush=True)
    uvicorn.run(make_app(path), host="127.0.0.1", port=port, log_level="warning", access_log=False)
