"""``foldserve serve``: serve a model repository over KServe v2 gRPC and REST.

Every server setting is a flag (``--http-port``) and an environment variable (``FOLDSERVE_HTTP_PORT``).
"""
from __future__ import annotations

import argparse
import typing

from foldserve.errors import ConfigError

REQUIRES = ("onnxruntime", "fastapi", "uvicorn", "prometheus_client")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from server.settings import Settings

    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC (:8001) and REST (:8000)")
    for name, field in Settings.model_fields.items():
        if name == "log_level":
            continue
        flag = "--" + name.replace("_", "-")
        help_ = field.description or ""
        ann = field.annotation
        origin = typing.get_origin(ann)
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if ann is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif origin is list:
            p.add_argument(flag, dest=name, nargs="+", default=None, help=help_)
        elif origin is typing.Literal:
            p.add_argument(flag, dest=name, choices=list(typing.get_args(ann)), default=None, help=help_)
        else:
            base = args[0] if args else ann
            conv = {int: int, float: float}.get(base, str)
            p.add_argument(flag, dest=name, type=conv, default=None, help=help_)
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace):
    from pydantic import ValidationError

    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: {first['msg']}") from None
    if not settings.repository.is_dir():
        raise ConfigError(f"--repository {settings.repository}: no such directory (build one with `foldserve fold` "
                          f"or `make model`)")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return settings


def run(args: argparse.Namespace) -> int:
    from server.main import run as run_server

    return run_server(settings_from(args))
