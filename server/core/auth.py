"""Bearer-token checks, shared by both transports (each passes the header value it received)."""
from __future__ import annotations

import hmac
from typing import Sequence

from foldserve.errors import Unauthenticated


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
