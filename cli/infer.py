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
    p.add_argument("file", nargs="?", help="an image (png/jpg/...), .npy, or .npz (array 'x', the only array, or "
                                           "--key) for a model with one input")
    p.add_argument("--input", action="append", metavar="NAME=FILE", default=[],
                   help="a model with several inputs: one file per input (repeat the flag); a .npz FILE holding one "
                        "array per input name also works as the positional FILE")
    p.add_argument("--url", default="127.0.0.1:8001", help="server address: HOST:PORT (gRPC) or http://HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--version", default="")
    p.add_argument("--protocol", choices=("grpc", "http"), default=None, help="default: from --url")
    p.add_argument("--key", help="array name inside an .npz")
    p.add_argument("--top", type=int, default=3, help="classifiers: how many classes to print (default: 3)")
    p.add_argument("--raw", action="store_true",
                   help="classifiers: print the model's raw scores (logits) instead of probabilities (softmax)")
    p.add_argument("--auth-token", dest="token", help="bearer token, if the server requires one (the server's "
                                                       "--auth-token)")
    p.add_argument("--token", dest="token", help=argparse.SUPPRESS)            # the spelling of earlier releases
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


def _feeds(args: argparse.Namespace, meta: Any, pre: Preprocess) -> dict[str, np.ndarray]:
    """The request's inputs: FILE for a one-input model, --input NAME=FILE for each input, or one .npz holding
    every input by name."""
    from foldserve.datatypes import lookup

    by_name = {t.name: t for t in meta.inputs}
    given: dict[str, str] = {}
    for item in args.input:
        name, sep, file = item.partition("=")
        if not sep or not file:
            raise ConfigError(f"--input {item!r}: expected NAME=FILE")
        if name not in by_name:
            raise ConfigError(f"--input {item!r}: the model's inputs are {list(by_name)}")
        given[name] = file
    if args.file and given:
        raise ConfigError("give FILE or --input NAME=FILE, not both")
    if args.file and len(by_name) > 1:
        p = Path(args.file)
        if p.suffix != ".npz":
            raise ConfigError(f"the model has inputs {list(by_name)}: pass --input NAME=FILE for each, or one .npz "
                              f"with an array per input name")
        return {name: load_input(args.file, t.shape, lookup(t.datatype).numpy, name, args.scale, pre)
                for name, t in by_name.items()}
    if args.file:
        given = {meta.inputs[0].name: args.file}
    missing = [n for n in by_name if n not in given]
    if missing:
        raise ConfigError(f"no data for input(s) {missing}: pass " +
                          (" ".join(f"--input {n}=FILE" for n in missing) if given or len(by_name) > 1 else "FILE"))
    return {name: load_input(file, by_name[name].shape, lookup(by_name[name].datatype).numpy,
                             args.key if len(given) == 1 else None, args.scale, pre)
            for name, file in given.items()}


def probabilities(scores: np.ndarray) -> np.ndarray:
    """A classifier's outputs as probabilities: the softmax of its logits (in float64), or the outputs themselves
    when they already are probabilities (non-negative, summing to 1)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size and s.min() >= 0 and abs(s.sum() - 1) < 1e-3:
        return s
    e = np.exp(s - s.max())
    return e / e.sum()


def run(args: argparse.Namespace) -> int:
    from foldserve.client import connect

    client = connect(args.url, args.protocol, args.token)
    meta = client.metadata(args.model, args.version)
    raw = meta.parameters.get("foldserve_preprocess")
    pre = Preprocess.from_json(raw, "the served model's preprocessing record") if raw else Preprocess()
    feeds = _feeds(args, meta, pre)
    datatypes = {t.name: t.datatype for t in meta.inputs}
    out = meta.outputs[0]
    classify = pre.task == "classification" and not args.out and len(meta.outputs) == 1
    if classify:
        top = max(1, args.top)
        classes = out.shape[-1] if out.shape and out.shape[-1] > 0 else 0
        n = len(next(iter(feeds.values())))
        # every class's score (with its label, from the classification extension), so that probabilities are the
        # softmax over all of them
        result = client.infer(args.model, feeds, version=args.version, datatypes=datatypes,
                              outputs=[out.name], classification=classes or top)[out.name]
        for i, row in enumerate(result.reshape(n, -1)):
            entries = [entry.decode().split(":", 2) for entry in row]
            scores = np.array([float(e[0]) for e in entries])
            shown = "score" if args.raw or not classes else "probability"
            values = scores if shown == "score" else probabilities(scores)
            print(f"sample {i}:")
            for (_, idx, *label), value in list(zip(entries, values, strict=True))[:top]:
                print(f"  {label[0] if label else idx:>12}  class {idx:>4}  {shown} {value:.4f}")
        return 0
    outputs = client.infer(args.model, feeds, version=args.version, datatypes=datatypes)
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
