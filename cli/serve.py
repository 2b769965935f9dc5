"""``foldserve serve``: serve a model repository over KServe v2 gRPC and REST.

Every server setting is a flag (``--http-port``) and an environment variable (``FOLDSERVE_HTTP_PORT``).
"""
from __future__ import annotations

import argparse
import typing

from foldserve.errors import ConfigError

REQUIRES = ("onnxruntime", "fastapi", "uvicorn", "prometheus_client")


#: the help's sections, in order; every setting but log_level (the global `foldserve --log-level`) is in one
GROUPS: dict[str, tuple[str, ...]] = {
    "network": ("host", "http_port", "grpc_port", "tls_cert", "tls_key", "tls_ca"),
    "models": ("repository", "models", "allow_unverified", "strict", "strict_readiness", "repository_api", "warmup",
               "max_model_memory_mb"),
    "runtime and batching": ("provider", "device_id", "io_binding", "intra_op_threads", "inter_op_threads", "spin",
                             "instances", "batching", "batch_policy", "max_queue_delay_us", "max_queue_size"),
    "limits": ("max_request_bytes", "max_elements", "max_string_elements", "max_concurrent_requests", "shed_lag_ms",
               "request_timeout_s", "body_timeout_s", "header_timeout_s", "idle_timeout_s", "max_connections",
               "max_streams_per_connection", "max_header_bytes", "max_shm_regions"),
    "auth": ("auth_token", "admin_token", "insecure_admin", "public_metadata"),
    "workers and shutdown": ("workers", "handoff", "event_loop", "grace_period_s"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pydantic_core import PydanticUndefined

    from server.settings import Settings
    from server.settings import flag as setting_flag

    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC (:8001) and REST (:8000)",
                       usage="foldserve serve [--repository DIR] [options]",
                       description="Every flag is also an environment variable: FOLDSERVE_ and its name "
                                   "(--http-port: FOLDSERVE_HTTP_PORT). Tracing: OTEL_* variables.")
    sections = {title: p.add_argument_group(title) for title in GROUPS}
    groups = {name: sections[title] for title, names in GROUPS.items() for name in names}
    for name, field in Settings.model_fields.items():
        if name == "log_level":
            continue                    # the global `foldserve --log-level`
        group = groups[name]
        flag = setting_flag(name)
        default = field.get_default(call_default_factory=True)
        shown = "" if default in (None, PydanticUndefined) or default == [] else f" (default: {default})"
        help_ = (field.description or "").replace("%", "%%") + shown
        if name == "repository":      # Triton's spelling too
            group.add_argument("--model-repository", dest=name, default=None, help=argparse.SUPPRESS)
        ann = field.annotation
        origin = typing.get_origin(ann)
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if ann is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif origin is list:
            group.add_argument(flag, dest=name, nargs="+", default=None, help=help_)
        elif origin is typing.Literal:
            group.add_argument(flag, dest=name, choices=list(typing.get_args(ann)), default=None, help=help_)
        else:
            base = args[0] if args else ann
            conv = {int: int, float: float}.get(base, str)
            group.add_argument(flag, dest=name, type=conv, default=None, help=help_)
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
    problem = settings.fail_open()
    if problem:
        raise ConfigError(problem)
    if settings.provider == "cuda":
        from server.core.runtime import cuda_problem

        why = cuda_problem(settings.device_id)
        if why:
            raise ConfigError(f"--provider cuda: {why}; serve with --provider auto (CUDA where there is one) or cpu")
    check_ports(settings.host, settings.http_port, settings.grpc_port)
    check_repository(settings.repository, settings.strict)
    return settings


def check_ports(host: str, http_port: int, grpc_port: int) -> None:
    """Fail in one line, before any model is loaded, when a port is taken (or both are the same)."""
    import socket

    if http_port and http_port == grpc_port:
        raise ConfigError(f"--http-port and --grpc-port are both {http_port}: give them different ports")
    for flag, port in (("--http-port", http_port), ("--grpc-port", grpc_port)):
        if not port:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise ConfigError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                  f"is another server running? choose another port") from None


def check_repository(repository, strict: bool) -> None:
    """An empty repository, or a model folder given instead of a repository, is almost always a mistake."""
    import logging
    from pathlib import Path

    from server.core.repository import ModelRepository

    repo = ModelRepository(Path(repository))
    if repo.names():
        return
    if (Path(repository) / "config.pbtxt").is_file():
        problem = f"--repository {repository} is a model folder, not a repository: pass its parent"
    else:
        problem = f"--repository {repository} holds no model"
    message = f"{problem} ({repo.describe()})"
    if strict:
        raise ConfigError(message)
    logging.getLogger("foldserve").warning("%s; serving nothing until models are loaded (--strict refuses)", message)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if settings.worker_count() > 1:  # the supervisor: no grpc or onnxruntime in this process
        from server.supervisor import supervise

        return supervise(settings.model_copy(update={"log_level": getattr(args, "log_level", None) or "INFO"}))
    from server.main import run as run_server

    try:
        return run_server(settings)
    except OSError as exc:  # a port taken between the check and the bind
        raise ConfigError(f"cannot start the server: {exc}") from None


def configuration_markdown() -> str:
    """docs/configuration.md: every server setting as its flag, environment variable, default and meaning, from
    ``Settings`` itself (``make docs`` writes it; a test fails when the page and the code differ)."""
    from pydantic_core import PydanticUndefined

    from server.settings import Settings

    lines = ["# Configuration of `foldserve serve`", "",
             "Every setting is a flag and an environment variable (`FOLDSERVE_` and its name); a flag wins. Written",
             "from `server/settings.py` by `make docs`; `tests/test_docs.py` fails when they differ.", "",
             "| flag | environment | default | what |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default in (None, PydanticUndefined) or default == [] else f"`{default}`"
        what = (field.description or "").replace("|", "\\|")
        lines.append(f"| `--{name.replace('_', '-')}` | `FOLDSERVE_{name.upper()}` | {shown} | {what} |")
    return "\n".join(lines) + "\n"
