"""Every ProxyError maps to its status, type and code (docs/architecture.md §5.3) and envelope."""

from __future__ import annotations

import msgspec
import pytest

from clipia_proxy import errors

EXPECTED = {
    errors.InvalidRequest: (400, "invalid_request"),
    errors.InvalidApiKey: (401, "invalid_api_key"),
    errors.BudgetExceeded: (402, "budget_exceeded"),
    errors.ModelNotAllowed: (403, "model_not_allowed"),
    errors.OriginNotAllowed: (403, "origin_not_allowed"),
    errors.NotFound: (404, "not_found"),
    errors.ModelNotFound: (404, "model_not_found"),
    errors.MethodNotAllowed: (405, "method_not_allowed"),
    errors.RequestTimeout: (408, "request_timeout"),
    errors.RequestTooLarge: (413, "request_too_large"),
    errors.UnsupportedMediaType: (415, "unsupported_media_type"),
    errors.ExpectationFailed: (417, "expectation_failed"),
    errors.HeadersTooLarge: (431, "request_header_fields_too_large"),
    errors.RateLimited: (429, "rate_limit_exceeded"),
    errors.ConcurrencyLimited: (429, "concurrency_limit_exceeded"),
    errors.InternalError: (500, "internal_error"),
    errors.UpstreamUnavailable: (502, "upstream_unavailable"),
    errors.UpstreamInvalidResponse: (502, "upstream_invalid_response"),
    errors.QuotaStoreUnavailable: (503, "quota_store_unavailable"),
    errors.Overloaded: (503, "overloaded"),
    errors.Draining: (503, "draining"),
    errors.UpstreamTimeout: (504, "upstream_timeout"),
}


def _all_subclasses(cls: type) -> set[type]:
    found: set[type] = set(cls.__subclasses__())
    for sub in list(found):
        found |= _all_subclasses(sub)
    return found


def test_every_subclass_is_mapped() -> None:
    public = {c for c in _all_subclasses(errors.ProxyError) if c.__module__ == errors.__name__}
    assert public == set(EXPECTED)


@pytest.mark.parametrize(("cls", "expected"), list(EXPECTED.items()))
def test_status_code_and_envelope(cls: type[errors.ProxyError], expected: tuple[int, str]) -> None:
    error = cls("something went wrong", param="model", retry_after=7)
    assert (error.status, error.code) == expected
    body = msgspec.json.decode(error.body())
    assert body == {
        "error": {
            "message": "something went wrong",
            "type": error.type,
            "param": "model",
            "code": expected[1],
        }
    }
    expected_headers = {"Retry-After": "7"}
    if cls in {errors.Draining, errors.Overloaded, errors.RequestTimeout}:  # also close
        expected_headers["Connection"] = "close"
    if cls is errors.UpstreamTimeout:  # Clipia may be generating: the client must not retry
        expected_headers["x-should-retry"] = "false"
    assert error.headers() == expected_headers


def test_no_retry_after_by_default() -> None:
    assert errors.InvalidRequest("x").headers() == {}


def test_message_cannot_break_the_json() -> None:
    body = errors.error_body('quote " and\r\nnewline', type_="t", code="c")
    assert b"\r\n" not in body
    assert msgspec.json.decode(body)["error"]["message"] == 'quote " and\r\nnewline'
