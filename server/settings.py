"""Server settings in one place: environment variables (``FOLDSERVE_*``) and CLI flags map onto these."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False             # a host name: it may resolve to anything


class Settings(BaseSettings):
    """Every server option. ``foldserve serve --help`` lists the same options as flags."""

    model_config = SettingsConfigDict(env_prefix="FOLDSERVE_", extra="ignore")

    repository: Path = Field(Path("model_repository"), description="model repository (Triton layout)")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 inside containers")
    http_port: int = Field(8000, ge=0, le=65535, description="REST port (0: pick a free one)")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    models: list[str] = Field(default_factory=list, description="load only these models at start (default: all)")

    workers: str = Field("1", pattern=r"^(auto|[1-9][0-9]{0,2})$",
                         description="serving processes on the same ports (SO_REUSEPORT; one connection lands on one "
                                     "worker); auto: one per two cores")
    handoff: bool = Field(True, description="with several workers, one that has executions waiting while another "
                                            "idles hands them over (load follows work, not connections)")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="the event loop both transports run on (auto: uvloop when installed)")
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="onnxruntime execution provider")
    device_id: int = Field(0, ge=0, description="CUDA device id")
    io_binding: bool = Field(True, description="use IO binding with the CUDA provider")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session (0: default)")
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads (0: default)")
    spin: bool = Field(True, description="let onnxruntime's intra-op threads spin between the steps of a run (they "
                                          "stop when the run ends: spinning on while idle took a fifth of the "
                                          "throughput at concurrency 32 on 2 cores; off: never spin, +0.3 ms at "
                                          "concurrency 1)")
    instances: int = Field(0, ge=0, description="parallel executions per model (0: from config.pbtxt, else 1)")

    batching: bool = Field(True, description="dynamic batching for models whose config enables it")
    batch_policy: Literal["delay", "eager"] = Field(
        "delay", description="delay: wait up to max_queue_delay for a fuller batch (Triton); eager: never wait")
    max_queue_delay_us: int | None = Field(None, ge=0, description="override config's max_queue_delay_microseconds")
    max_queue_size: int = Field(256, ge=1, description="requests waiting per model before RESOURCE_EXHAUSTED / 429")
    max_concurrent_requests: int = Field(
        0, ge=0, description="requests handled at once per transport before RESOURCE_EXHAUSTED / 429 "
                             "(0: max_queue_size + 64)")
    shed_lag_ms: float = Field(100.0, ge=0, description="answer new inference requests 429 / RESOURCE_EXHAUSTED at "
                                                        "once while the event loop runs this late (a burst drains "
                                                        "at the cost of refusals; 0: off)")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer fails with DEADLINE_EXCEEDED")
    warmup: bool = Field(True, description="run each model over its batch sizes at load")

    allow_unverified: bool = Field(False, description="serve versions whose verification failed or is missing")
    strict: bool = Field(False, description="refuse to start when the repository holds no model (default: warn)")
    strict_readiness: bool = Field(True, description="the server is ready only while every model it was asked to "
                                                     "load serves (Triton's strict readiness); off: ready once "
                                                     "started, whatever failed to load")
    repository_api: bool = Field(False, description="enable the repository load/unload API")
    admin_token: str | None = Field(None, description="bearer token the repository API and the log and trace "
                                                        "settings require (without it, they take --auth-token)")
    auth_token: str | None = Field(None, description="bearer token inference requires (off when unset)")
    insecure_admin: bool = Field(False, description="allow --repository-api without --admin-token on a "
                                                    "non-loopback address (anyone who reaches the port can load "
                                                    "and unload models)")

    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest request body / message")
    body_timeout_s: float = Field(10.0, gt=0, description="a REST request body (and a gRPC stream's first "
                                                           "message) must arrive within this time (408)")
    idle_timeout_s: float = Field(60.0, gt=0, description="close a connection with no request in flight after "
                                                           "this long (REST keep-alive, gRPC max_connection_idle)")
    max_connections: int = Field(0, ge=0, description="open connections per transport; past it new ones are "
                                                       "refused (0: the file-descriptor limit / 3, at most 4096)")
    max_streams_per_connection: int = Field(128, ge=1, le=2**31 - 1,
                                            description="concurrent gRPC calls per connection (HTTP/2 "
                                                        "max_concurrent_streams); a client past it queues calls")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024,
                                  description="largest REST request header block (431 past it)")
    header_timeout_s: float = Field(10.0, gt=0, description="a REST request's headers must arrive within this "
                                                             "time (408), like nginx's client_header_timeout")
    max_model_memory_mb: int = Field(
        0, ge=0, description="what loading one version may cost: memory grown by building and warming it, and the "
                             "largest tensor its graph computes from constants (0: max(1024, 8 x the model's MB))")
    max_shm_regions: int = Field(256, ge=1, le=65536,
                                 description="system shared-memory regions registered at once (RESOURCE_EXHAUSTED / "
                                             "429 past it); regions naming one object share one descriptor")
    max_elements: int = Field(64 * 1024 * 1024, gt=0, description="largest element count of one input tensor")
    max_string_elements: int = Field(1024 * 1024, gt=0,
                                     description="largest element count of one BYTES (string) input tensor: each "
                                                 "element is decoded one by one, so it is bounded apart")
    grace_period_s: float = Field(10.0, ge=0, description="time to finish in-flight requests on SIGTERM")

    public_metadata: bool = Field(False, description="with --auth-token: leave metadata, config, statistics, the "
                                                     "repository index, /metrics and /docs open (health always is)")

    tls_cert: Path | None = Field(None, description="TLS certificate (PEM) for gRPC and HTTPS")
    tls_key: Path | None = Field(None, description="TLS private key (PEM)")
    tls_ca: Path | None = Field(None, description="CA bundle: require client certificates (mutual TLS)")

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")

    def fail_open(self) -> str | None:
        """A combination of settings that would leave open what the user meant to close, or None."""
        for flag, value in (("--auth-token", self.auth_token), ("--admin-token", self.admin_token)):
            if value is not None and not value.strip():
                return f"{flag} is empty: an empty token would switch authentication off; give a token or omit the flag"
        if self.repository_api and self.auth_token and not self.admin_token:
            return ("--repository-api with --auth-token but no --admin-token would leave load/unload open while "
                    "inference needs a token: give --admin-token (it may equal the auth token)")
        if self.repository_api and not self.admin_token and not self.insecure_admin and not _loopback(self.host):
            return (f"--repository-api without --admin-token on {self.host} would let anyone who reaches the port "
                    f"load and unload models: give --admin-token, bind a loopback address, or pass --insecure-admin")
        if bool(self.tls_cert) != bool(self.tls_key):
            return "--tls-cert and --tls-key go together"
        if self.tls_ca and not self.tls_cert:
            return ("--tls-ca (require client certificates) needs --tls-cert and --tls-key: without them the server "
                    "would serve plaintext and check no client")
        if self.public_metadata and not self.auth_token:
            return "--public-metadata only means something with --auth-token (without a token everything is public)"
        return None

    def metadata_token(self) -> str | None:
        """The token metadata, config, statistics, index, /metrics and /docs need (None: public)."""
        return None if self.public_metadata else self.auth_token

    def connection_limit(self) -> int:
        """Connections per transport: below the process's file-descriptor limit (raised to its hard limit at
        start), leaving room for the other transport, model files and logs."""
        if self.max_connections:
            return self.max_connections
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, min(4096, (soft - 64) // 3))

    def worker_count(self) -> int:
        if self.workers == "auto":
            import os

            return max(1, (os.cpu_count() or 1) // 2)
        return int(self.workers)

    def concurrency_limit(self) -> int:
        return self.max_concurrent_requests or self.max_queue_size + 64


def flag(field_name: str) -> str:
    """The ``serve`` flag of a setting (``max_model_memory_mb`` -> ``--max-model-memory-mb``; its environment
    variable is ``FOLDSERVE_`` and the name in capitals): how the server's messages name the setting an operator
    can change. The one place that spells the rule ``cli/serve.py`` builds its flags by."""
    if field_name not in Settings.model_fields:
        raise KeyError(f"no setting {field_name!r}")
    return "--" + field_name.replace("_", "-")
