"""The gateway's own errors, and how each becomes an OpenAI-style HTTP response.

Every error the proxy itself returns is a :class:`ProxyError`; one middleware renders it as
``{"error": {"message", "type", "param", "code"}}`` with the class's ``status``. The tree::

    ProxyError
    ├── InvalidRequest          400 invalid_request        malformed body, bad field, cap exceeded
    ├── InvalidApiKey           401 invalid_api_key        missing/unknown/expired key, untrusted identity
    ├── BudgetExceeded          402 budget_exceeded        a budget period cannot cover the reservation
    ├── ModelNotAllowed         403 model_not_allowed      the team may not use the model
    ├── NotFound                404 not_found              unknown route or generation id
    │   └── ModelNotFound       404 model_not_found        model not in the (team's view of the) catalog
    ├── MethodNotAllowed        405 method_not_allowed     known route, wrong method
    ├── RequestTimeout          408 request_timeout        body not received within ``server.body_timeout_seconds``
    ├── RequestTooLarge         413 request_too_large      body over ``server.max_body_bytes``
    ├── UnsupportedMediaType    415 unsupported_media_type body is not ``application/json``
    ├── ExpectationFailed       417 expectation_failed     an ``Expect`` other than ``100-continue``
    ├── HeadersTooLarge         431 request_header_fields_too_large  a header line or the whole head too large
    ├── RateLimited             429 rate_limit_exceeded    RPM/TPM (``Retry-After``)
    │   └── ConcurrencyLimited  429 concurrency_limit_exceeded
    ├── InternalError           500 internal_error         a bug; the body holds only the request id
    ├── UpstreamUnavailable     502 upstream_unavailable   Clipia unreachable, redirected, or it rejected *our* key
    │   └── UpstreamInvalidResponse 502 upstream_invalid_response  a 200 that is no valid answer, or quotes our key
    ├── QuotaStoreUnavailable   503 quota_store_unavailable
    ├── Overloaded              503 overloaded             a port at ``server.max_connections``, or every upstream connection in use
    ├── Draining                503 draining               shutting down
    └── UpstreamTimeout         504 upstream_timeout       no first byte within ``first_byte_timeout_seconds``

Messages are written for people and never hold a secret, a header value or an upstream body.
"""

from __future__ import annotations

from typing import ClassVar, Final

import msgspec

__all__ = [
    "BudgetExceeded",
    "ConcurrencyLimited",
    "Draining",
    "ExpectationFailed",
    "HeadersTooLarge",
    "InternalError",
    "InvalidApiKey",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotAllowed",
    "ModelNotFound",
    "NotFound",
    "OriginNotAllowed",
    "Overloaded",
    "ProxyError",
    "QuotaStoreUnavailable",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "UnsupportedMediaType",
    "UpstreamInvalidResponse",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
]


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> bytes:
    """Return the OpenAI error envelope as JSON bytes."""
    return msgspec.json.encode(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class ProxyError(Exception):
    """An error the gateway answers itself; subclasses fix ``status``, ``type`` and ``code``."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "internal_error"
    default_reason: ClassVar[str | None] = None
    """The ``rejections_total`` reason when this refusal stops a request before the upstream."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message: Final = message
        self.param: Final = param
        self.retry_after: Final = retry_after
        """Seconds for the ``Retry-After`` header, when the client may try again later."""
        self.reason: Final = reason if reason is not None else self.default_reason
        """Why the request was refused (a metrics label), or None for other errors."""

    def body(self) -> bytes:
        """Return the OpenAI error envelope for this error."""
        return error_body(self.message, type_=self.type, code=self.code, param=self.param)

    def headers(self) -> dict[str, str]:
        """Return the extra response headers this error carries."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(0, self.retry_after))}


class InvalidRequest(ProxyError):
    """Raised for a malformed body, a mistyped field or a cap the request exceeds."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    default_reason = "bad_request"


class OriginNotAllowed(ProxyError):
    """Raised when a browser page's ``Origin`` may not call ``/mcp`` (DNS-rebinding protection)."""

    status = 403
    type = "permission_error"
    code = "origin_not_allowed"
    default_reason = "auth"


class InvalidApiKey(ProxyError):
    """Raised when the caller's identity is missing, unknown, expired or untrusted."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    default_reason = "auth"


class BudgetExceeded(ProxyError):
    """Raised when a budget period of the team cannot cover the request's reservation."""

    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"
    default_reason = "budget"


class ModelNotAllowed(ProxyError):
    """Raised when the team's policy does not allow the requested model."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed"
    default_reason = "model_not_allowed"


class NotFound(ProxyError):
    """Raised for an unknown route or a generation id the team did not create."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    """Raised when the model is not a chat model of the catalog."""

    code = "model_not_found"
    default_reason = "model_not_found"


class MethodNotAllowed(ProxyError):
    """Raised for a known route called with the wrong method."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ProxyError):
    """Raised when the body did not arrive within ``server.body_timeout_seconds``."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    default_reason = "bad_request"

    def headers(self) -> dict[str, str]:
        """Also close the connection: the rest of a late body is not worth reading."""
        return {**super().headers(), "Connection": "close"}


class RequestTooLarge(ProxyError):
    """Raised when the body is larger than ``server.max_body_bytes``."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    default_reason = "bad_request"


class UnsupportedMediaType(ProxyError):
    """Raised when the body is not declared as ``application/json`` (or is content-encoded)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"
    default_reason = "bad_request"


class ExpectationFailed(ProxyError):
    """Raised for an ``Expect`` header other than ``100-continue``."""

    status = 417
    type = "invalid_request_error"
    code = "expectation_failed"
    default_reason = "bad_request"


class HeadersTooLarge(ProxyError):
    """Raised when a header line, or the request head as a whole, passes the gateway's caps."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"
    default_reason = "bad_request"


class RateLimited(ProxyError):
    """Raised when a request or token rate limit is reached."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    default_reason = "rpm"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        reason: str | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(message, param=param, retry_after=retry_after, reason=reason)
        self.limit: Final = limit
        """The limit reached, when it is not the team's own (a key's ``limits``)."""


class ConcurrencyLimited(RateLimited):
    """Raised when the team already has its maximum number of requests in flight."""

    code = "concurrency_limit_exceeded"
    default_reason = "concurrency"


class InternalError(ProxyError):
    """Rendered for an unexpected exception: a bug. The message names only the request id."""


class UpstreamUnavailable(ProxyError):
    """Raised when Clipia cannot be reached, redirects, or rejects the gateway's own key."""

    status = 502
    type = "api_error"
    code = "upstream_unavailable"


class UpstreamInvalidResponse(UpstreamUnavailable):
    """Raised when Clipia's 200 is no valid answer, or quotes the gateway's own key.

    Not JSON, or an event stream for a non-streaming request: the body is withheld.
    """

    code = "upstream_invalid_response"


class QuotaStoreUnavailable(ProxyError):
    """Raised when the quota store is down and ``store.on_error`` is ``fail_closed``."""

    status = 503
    type = "api_error"
    code = "quota_store_unavailable"
    default_reason = "store_unavailable"


class Overloaded(ProxyError):
    """Raised when the gateway sheds load: a port full, or every upstream connection taken.

    A port at ``server.max_connections``, or every ``upstream.max_connections`` in use: 503
    rather than 502, since nothing was sent and SDKs retry a 502 at once; the client should
    come back after ``Retry-After``.
    """

    status = 503
    type = "api_error"
    code = "overloaded"
    default_reason = "overloaded"

    def headers(self) -> dict[str, str]:
        """Also close the connection: a shed client comes back on a new one."""
        return {**super().headers(), "Connection": "close"}


class Draining(ProxyError):
    """Raised for new requests once the gateway has begun shutting down."""

    status = 503
    type = "api_error"
    code = "draining"

    def headers(self) -> dict[str, str]:
        """Also close the connection: the client's next request should go to another replica."""
        return {**super().headers(), "Connection": "close"}


class UpstreamTimeout(ProxyError):
    """Raised when Clipia sends no first byte within ``first_byte_timeout_seconds``."""

    status = 504
    type = "api_error"
    code = "upstream_timeout"

    def headers(self) -> dict[str, str]:
        """Add ``x-should-retry: false``: Clipia may be generating (and billing) the answer."""
        return {**super().headers(), "x-should-retry": "false"}
