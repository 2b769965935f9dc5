"""Bearer-token checks, shared by both transports (each passes the header value it received)."""
from __future__ import annotations

import hmac

from foldserve.errors import Unauthenticated


def check_bearer(authorization: str | None, token: str | None, what: str) -> None:
    """No-op when ``token`` is unset; else the value must be ``Bearer <token>`` (constant-time compare)."""
    if not token:
        return
    got = authorization or ""
    if not got:
        raise Unauthenticated(f"{what} needs an 'authorization: Bearer <token>' header")
    if not got.startswith("Bearer "):
        raise Unauthenticated(f"{what}: the authorization header must be 'Bearer <token>'")
    if not hmac.compare_digest(got[7:].encode(), token.encode()):
        raise Unauthenticated(f"{what}: the bearer token is not valid")
