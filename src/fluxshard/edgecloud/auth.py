"""Transport security of the edge–cloud link: TLS credentials and a bearer token, both sides.

Server: TLS from PEM cert/key files (:func:`server_credentials`) and a :class:`TokenInterceptor` that checks
``authorization: Bearer <token>`` with a constant-time compare *before* any handler runs, so a rejected call never
creates stream state. The standard health service is exempt (orchestrators' probes carry no token). Edge: channel
credentials from a CA file, the token as call metadata (works on plaintext loopback too) or as call credentials
(TLS only: gRPC refuses to send call credentials in the clear), and :func:`open_channel` that combines them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from fluxshard.edgecloud import wire
from fluxshard.errors import FluxShardError

HEALTH_PREFIX = "/grpc.health.v1.Health/"
METADATA_KEY = "authorization"
MAX_TOKEN_CHARS = 4096


class AuthError(FluxShardError):
    """A certificate, key or token file cannot be used (missing, empty, not PEM, not a printable token)."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuthError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise AuthError(f"{what} {path}: empty file")
    return data


def _pem(path: str | Path, what: str) -> bytes:
    data = _read(path, what)
    if b"-----BEGIN " not in data:
        raise AuthError(f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return data


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped): printable ASCII without spaces."""
    raw = _read(path, "token file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise AuthError(f"token file {path}: not ASCII text") from None
    if not token or len(token) > MAX_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        raise AuthError(f"token file {path}: the token must be 1-{MAX_TOKEN_CHARS} printable ASCII characters "
                        "without spaces")
    return token


# ---------------------------------------------------------------------------------------------------- server


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    """TLS server credentials from a PEM certificate chain and its private key."""
    return grpc.ssl_server_credentials([(_pem(key_file, "TLS key"), _pem(cert_file, "TLS certificate"))])


def _abort_handler(handler: grpc.RpcMethodHandler | None, detail: str) -> grpc.RpcMethodHandler:
    """A handler of the same call shape as ``handler`` that only aborts UNAUTHENTICATED."""

    async def unary_abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    async def stream_abort(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    if handler is None or (not handler.request_streaming and not handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(unary_abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(stream_abort)
    return grpc.unary_stream_rpc_method_handler(unary_abort)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call (health checks excepted) whose ``authorization`` metadata is not ``Bearer <token>``.

    ``hmac.compare_digest`` on bytes: the compare time does not depend on where a guess first differs.
    ``rejected`` counts refusals (tests and logs)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise AuthError("the server token is empty")
        self._expected = f"Bearer {token}".encode()
        self.rejected = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        got = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                got = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(got, self._expected):
            return await continuation(handler_call_details)
        self.rejected += 1
        detail = "missing bearer token" if not got else "invalid bearer token"
        return _abort_handler(await continuation(handler_call_details), detail)


# ---------------------------------------------------------------------------------------------------- edge


def channel_credentials(ca_file: str | Path) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting the CA (or self-signed server certificate) in ``ca_file``."""
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca_file, "TLS CA"))


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying the token (pass as ``metadata=`` to a call; works with or without TLS)."""
    return () if not token else ((METADATA_KEY, f"Bearer {token}"),)


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """The token as call credentials (composed into TLS channel credentials; gRPC never sends them in clear)."""
    return grpc.access_token_call_credentials(token)


def open_channel(
    target: str,
    *,
    ca_file: str | Path | None = None,
    token: str | None = None,
    insecure: bool = False,
    options: list[tuple[str, int]] | None = None,
) -> grpc.aio.Channel:
    """An aio channel to a FluxShard server: TLS with ``ca_file`` (+ the token as call credentials), or plaintext
    only when ``insecure`` (then pass :func:`token_metadata` on each call)."""
    opts = wire.channel_options() if options is None else options
    if ca_file is not None:
        creds = channel_credentials(ca_file)
        if token:
            creds = grpc.composite_channel_credentials(creds, token_call_credentials(token))
        return grpc.aio.secure_channel(target, creds, options=opts)
    if not insecure:
        raise AuthError("no TLS CA given: pass --tls-ca F, or --insecure for plaintext")
    return grpc.aio.insecure_channel(target, options=opts)
