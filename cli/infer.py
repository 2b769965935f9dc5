"""``foldserve infer``: send an image or a .npy/.npz to a running server and print the answer.

The model's metadata says the input's name, datatype and shape, and its preprocessing record (served as
the ``foldserve_preprocess`` config parameter) says the range of the data it was trained on, so an image's
0..255 pixels are mapped to that range unless ``--scale`` says otherwise. Classifiers print their top
classes; other models (a denoiser) print the output array's summary and can save it with ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from foldserve.errors import ConfigError, DataError
from foldserve.records import Preprocess

REQUIRES: tuple[str, ...] = ()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="send an image or .npy/.npz to a running server and print the answer")
    p.add_argument("file", help="an image (png/jpg/...), .npy, or .npz (array 'x', the only array, or --key)")
    p.add_argument("--url", default="127.0.0.1:8001", help="server address: HOST:PORT (gRPC) or http://HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--version", default="")
    p.add_argument("--protocol", choices=("grpc", "http"), default=None, help="default: from --url")
    p.add_argument("--key", help="array name inside an .npz")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--token", help="bearer token, if the server requires one")
    p.add_argument("--scale", type=float, default=None,
                   help="images: multiply pixel values (0..255) by this (default: map 0..255 to the range the "
                        "model was trained on, from its preprocessing record)")
    p.add_argument("--out", help="save the output tensor(s) to this .npy/.npz instead of printing classes")
    p.set_defaults(func=run)


def _load_array(p: Path, key: str | None) -> np.ndarray:
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    with np.load(p, allow_pickle=False) as f:
        if key is not None and key not in f.files:
            raise DataError(f"{p}: no array {key!r} (arrays: {', '.join(f.files)})")
        if key is None and len(f.files) != 1 and "x" not in f.files:
            raise DataError(f"{p}: holds {f.files}; choose one with --key")
        return f[key or ("x" if "x" in f.files else f.files[0])]


def _load_image(p: Path, dims: list[int], scale: float | None, pre: Preprocess) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading images needs Pillow (pip install pillow); or send a .npy") from None
    if len(dims) not in (2, 3) or any(d < 1 for d in dims):
        raise DataError(f"the model's input has per-sample shape {dims}: an image cannot be fitted to it")
    c, h, w = dims if len(dims) == 3 else (1, *dims)
    try:
        with Image.open(p) as im:
            mode = "L" if c == 1 else "RGB"
            if im.size != (w, h) or im.mode != mode:
                print(f"note: image {im.size[0]}x{im.size[1]} {im.mode} converted to the model's {w}x{h} {mode}",
                      file=sys.stderr)
            arr = np.asarray(im.convert(mode).resize((w, h)), dtype=np.float32)
    except OSError as exc:
        raise DataError(f"{p}: not a readable image or .npy/.npz ({exc})") from None
    lo, hi = (pre.input_range or [0.0, 255.0]) if scale is None else (0.0, 255.0 * scale)
    arr = lo + arr * ((hi - lo) / 255.0)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr if len(dims) == 3 else arr[0]


def load_input(path: str, shape: list[int], numpy_dtype: Any, key: str | None = None, scale: float | None = None,
               pre: Preprocess | None = None) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    dims = shape[1:] if shape and shape[0] == -1 else shape
    if p.suffix in (".npy", ".npz"):
        arr = _load_array(p, key)
    else:
        arr = _load_image(p, dims, scale, pre or Preprocess())
    arr = np.asarray(arr, dtype=numpy_dtype)
    if arr.ndim == len(dims):
        arr = arr[None]
    return np.ascontiguousarray(arr)


def run(args: argparse.Namespace) -> int:
    from foldserve.client import connect
    from foldserve.datatypes import lookup

    client = connect(args.url, args.protocol, args.token)
    meta = client.metadata(args.model, args.version)
    inp, out = meta.inputs[0], meta.outputs[0]
    raw = meta.parameters.get("foldserve_preprocess")
    pre = Preprocess.from_json(raw, "the served model's preprocessing record") if raw else Preprocess()
    x = load_input(args.file, inp.shape, lookup(inp.datatype).numpy, args.key, args.scale, pre)
    classify = pre.task == "classification" and not args.out
    if classify:
        top = max(1, args.top)
        result = client.infer(args.model, {inp.name: x}, version=args.version, datatypes={inp.name: inp.datatype},
                              outputs=[out.name], classification=top)[out.name]
        for i, row in enumerate(result.reshape(len(x), -1)):
            print(f"sample {i}:")
            for entry in row:
                score, idx, *label = entry.decode().split(":", 2)
                print(f"  {label[0] if label else idx:>12}  class {idx:>4}  score {float(score):.4f}")
        return 0
    outputs = client.infer(args.model, {inp.name: x}, version=args.version, datatypes={inp.name: inp.datatype})
    if args.out:
        if args.out.endswith(".npz"):
            np.savez(args.out, **outputs)
        else:
            if len(outputs) != 1:
                raise ConfigError(f"--out {args.out}: the model has {len(outputs)} outputs; use a .npz")
            np.save(args.out, next(iter(outputs.values())))
        print(f"wrote {args.out}")
    for name, arr in outputs.items():
        a = np.asarray(arr, dtype=np.float64)
        print(f"{name}: shape {list(arr.shape)} {arr.dtype}, min {a.min():.4g}, max {a.max():.4g}, "
              f"mean {a.mean():.4g}")
    return 0
