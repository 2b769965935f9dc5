"""Who may call what: one table of operations -> access level, used by both transports, and the bearer-token
check (each transport passes the ``authorization`` header values it received).

Levels: ``PUBLIC`` (health: what load balancers and Kubernetes probe), ``METADATA`` (metadata, config,
statistics, the index, shared-memory status, /metrics and /docs: behind --auth-token unless
--public-metadata), ``INFER`` (inference, and registering the shared memory it reads: --auth-token) and
``ADMIN`` (the repository API, and the log and trace settings: --admin-token; where none is set, the log and
trace settings take --auth-token, so a server with a token never leaves them open).
"""
from __future__ import annotations

import enum
import hmac
from collections.abc import Sequence
from typing import Protocol

from foldserve.errors import Unauthenticated


class Access(enum.Enum):
    PUBLIC = "public"
    METADATA = "metadata"
    INFER = "inference"
    ADMIN = "administration (the repository API, log and trace settings)"


class Op(enum.Enum):
    """Every v2 operation, as both transports name it."""

    SERVER_LIVE = "server_live"
    SERVER_READY = "server_ready"
    MODEL_READY = "model_ready"
    SERVER_METADATA = "server_metadata"
    MODEL_METADATA = "model_metadata"
    MODEL_CONFIG = "model_config"
    STATISTICS = "statistics"
    REPOSITORY_INDEX = "repository_index"
    METRICS = "metrics"
    DOCS = "docs"
    INFER = "infer"
    LOAD = "load"
    UNLOAD = "unload"
    SHM_STATUS = "shm_status"
    SHM_REGISTER = "shm_register"
    SHM_UNREGISTER = "shm_unregister"
    CUDA_SHM = "cuda_shm"
    LOGGING = "logging"
    TRACE = "trace"


ACCESS: dict[Op, Access] = {
    Op.SERVER_LIVE: Access.PUBLIC, Op.SERVER_READY: Access.PUBLIC, Op.MODEL_READY: Access.PUBLIC,
    Op.SERVER_METADATA: Access.METADATA, Op.MODEL_METADATA: Access.METADATA, Op.MODEL_CONFIG: Access.METADATA,
    Op.STATISTICS: Access.METADATA, Op.REPOSITORY_INDEX: Access.METADATA, Op.METRICS: Access.METADATA,
    Op.DOCS: Access.METADATA, Op.SHM_STATUS: Access.METADATA,
    Op.INFER: Access.INFER, Op.SHM_REGISTER: Access.INFER, Op.SHM_UNREGISTER: Access.INFER,
    Op.CUDA_SHM: Access.INFER,
    Op.LOAD: Access.ADMIN, Op.UNLOAD: Access.ADMIN, Op.LOGGING: Access.ADMIN, Op.TRACE: Access.ADMIN,
}


class Tokens(Protocol):
    """What the settings say about tokens."""

    auth_token: str | None
    admin_token: str | None

    def metadata_token(self) -> str | None: ...


def token_for(access: Access, tokens: Tokens) -> str | None:
    if access is Access.PUBLIC:
        return None
    if access is Access.ADMIN:       # fail closed: the auth token guards them where no admin token is set
        return tokens.admin_token or tokens.auth_token
    if access is Access.METADATA:
        return tokens.metadata_token()
    return tokens.auth_token


def authorize(op: Op, tokens: Tokens, authorization: Sequence[str]) -> None:
    """Unauthenticated unless the call carries the token that ``op``'s access level needs (if one is set)."""
    access = ACCESS[op]
    check_bearer(authorization, token_for(access, tokens), access.value)


def check_bearer(authorization: Sequence[str], token: str | None, what: str) -> None:
    """No-op when ``token`` is unset; else exactly one ``authorization`` header (the transports disagree on
    which of several counts) whose value is ``Bearer <token>`` (constant-time compare)."""
    if not token:
        return
    if len(authorization) > 1:
        raise Unauthenticated(f"{what}: {len(authorization)} authorization headers; send exactly one")
    got = authorization[0] if authorization else ""
    if not got:
        raise Unauthenticated(f"{what} needs an 'authorization: Bearer <token>' header")
    if not got.startswith("Bearer "):
        raise Unauthenticated(f"{what}: the authorization header must be 'Bearer <token>'")
    if not hmac.compare_digest(got[7:].encode(), token.encode()):
        raise Unauthenticated(f"{what}: the bearer token is not valid")
