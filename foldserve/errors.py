"""One error hierarchy for the whole project.

Every stage raises these; each transport maps them once (CLI -> exit code, gRPC -> status code,
REST -> HTTP status). Messages say what was wrong and what to do. The library speaks in its own terms: a value
a caller gave is named by its field (``FoldRequest.max_batch_size``, ``Options.data``, ``TrainConfig.epochs``),
listed in ``fields``; the CLI shows each as its flag (``cli/flags.py``).
"""
from __future__ import annotations

import re

#: how a message names a request field (``FoldRequest.max_batch_size``); ``cli/flags.py`` renders the same ones
FIELD = re.compile(r"\b(?:FoldRequest|Options|TrainConfig)\.[a-z_]+\b")


class FoldserveError(Exception):
    """Base class of every error foldserve raises on purpose."""

    #: exit code of the CLI, HTTP status and gRPC status name for this class of error
    exit_code = 1
    http_status = 500
    grpc_status = "INTERNAL"

    @property
    def fields(self) -> list[str]:
        """The request fields the message names (``FoldRequest.max_batch_size``), in order."""
        return FIELD.findall(str(self))


class UserError(FoldserveError):
    """The user asked for something that cannot be done (bad flag, bad file, bad data)."""

    exit_code = 2
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class ConfigError(UserError):
    """An unknown architecture, dataset or option, or options that contradict each other."""


class DataError(UserError):
    """Training or inference data that is missing, unreadable or of the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign, or of an unsupported format version."""


class NotACheckpoint(CheckpointError):
    """A ``torch.save`` file that loads but is not a foldserve checkpoint (no format marker)."""


class UnreadableCheckpoint(CheckpointError):
    """A file ``torch.load(weights_only=True)`` refuses: corrupt, or a pickle of code. ``reason`` is torch's
    first sentence (what the pickle tried to load)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class FoldError(UserError):
    """A model that the folding pass refuses (train mode, untraceable, malformed graph)."""


class UnsupportedDataType(UserError):
    """A tensor datatype that the datatype table does not know (never silently taken as FP32)."""


class EntryError(UserError):
    """A repository entry (config.pbtxt, version folder, its files) that is missing or malformed."""


class WriteError(FoldserveError):
    """A file could not be written (disk full, permissions); what was there before is left as it was."""

    exit_code = 1


class VerificationFailed(FoldserveError):
    """The folded model does not compute what the unfolded one did."""

    exit_code = 1


# --- serving ---------------------------------------------------------------------------------------

class InvalidInput(UserError):
    """A request that does not match the model's metadata or the protocol."""


class PayloadTooLarge(InvalidInput):
    """A request larger than the server's limits (body size, element count)."""

    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


class BodyTimeout(InvalidInput):
    """A request body (or message) that did not arrive in full within the server's time limit."""

    http_status = 408
    grpc_status = "DEADLINE_EXCEEDED"


class ModelNotFound(FoldserveError):
    """No such model, or no such version of it."""

    exit_code = 2
    http_status = 404
    grpc_status = "NOT_FOUND"


class ModelNotReady(FoldserveError):
    """The model exists but cannot serve now (loading, failed to load, failed verification)."""

    http_status = 503
    grpc_status = "UNAVAILABLE"


class ServerNotReady(ModelNotReady):
    """The server is starting or shutting down."""


class QueueFull(FoldserveError):
    """The model's request queue is full: the client should back off and retry."""

    http_status = 429
    grpc_status = "RESOURCE_EXHAUSTED"


class RepositoryPollFailed(FoldserveError):
    """A load whose request itself cannot be turned into a repository to poll (model files sent with it). Triton
    answers INTERNAL ("failed to poll from model repository") and its own client examples check for that, so
    foldserve gives the same status, with the reason after Triton's words."""

    http_status = 500
    grpc_status = "INTERNAL"


class QueueRejected(FoldserveError):
    """The model's own queue policy (config.pbtxt's dynamic_batching.default_queue_policy) turned the request
    away: its queue is at max_queue_size, or the request waited past its queue timeout. Triton's answer."""

    http_status = 503
    grpc_status = "UNAVAILABLE"


class LimitExceeded(FoldserveError):
    """A server resource at its configured bound (shared-memory regions, ...): free some, or raise the limit."""

    http_status = 429
    grpc_status = "RESOURCE_EXHAUSTED"


class ClientGone(FoldserveError):
    """The client went away (closed its connection, cancelled its call) before its answer: the request was
    dropped, and never executed if it was still queued."""

    http_status = 499                    # nginx's "client closed request": nobody reads it
    grpc_status = "CANCELLED"


class RequestTimeout(FoldserveError):
    """The request waited longer than its timeout."""

    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


class Unauthenticated(FoldserveError):
    """Missing or wrong credentials."""

    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class ServerUnreachable(FoldserveError):
    """No server answers at the address the user gave (client side)."""

    exit_code = 2
    http_status = 503
    grpc_status = "UNAVAILABLE"


class AlreadyExists(UserError):
    """The thing to create exists already (a shared-memory region name registered twice)."""

    http_status = 409
    grpc_status = "ALREADY_EXISTS"


class NotSupported(FoldserveError):
    """A protocol extension or feature this server does not offer."""

    http_status = 501
    grpc_status = "UNIMPLEMENTED"


class WorkerUnavailable(FoldserveError):
    """A cluster operation could not reach every worker (one died or did not answer in time)."""

    http_status = 503
    grpc_status = "UNAVAILABLE"


class PermissionDenied(FoldserveError):
    """The operation is disabled or needs other credentials."""

    http_status = 403
    grpc_status = "PERMISSION_DENIED"


# The class a transport status maps back to on the client side (see :mod:`foldserve.client`): where several
# classes share a status, the one listed first in _CLIENT_SIDE (the more general) wins.
_CLIENT_SIDE = (InvalidInput, ModelNotFound, ModelNotReady, QueueFull, PayloadTooLarge, RequestTimeout, BodyTimeout,
                Unauthenticated, PermissionDenied, AlreadyExists)
BY_GRPC_STATUS: dict[str, type[FoldserveError]] = {}
BY_HTTP_STATUS: dict[int, type[FoldserveError]] = {}
for _cls in _CLIENT_SIDE:
    BY_GRPC_STATUS.setdefault(_cls.grpc_status, _cls)
    BY_HTTP_STATUS.setdefault(_cls.http_status, _cls)
