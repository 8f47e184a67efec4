"""The request plane's error type: a gRPC status code plus a message that says what to fix.

``HTTP_STATUS`` is the one table from those codes to the OpenAI-compatible HTTP API's statuses,
so both protocols answer a bad request the same way (README, "Errors").
"""

from __future__ import annotations

import grpc

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""gRPC status -> HTTP status. Retryable on both: RESOURCE_EXHAUSTED (429) and UNAVAILABLE
(503). A body over router.max_request_bytes is 413 on HTTP, refused before it is read; one
that does not arrive within router.http_read_timeout_s is 408."""

# OpenAI's error "type" for each HTTP status (what its SDKs and vLLM's server send).
HTTP_ERROR_TYPE = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None):
        """``param``: the request field at fault, where one is (the HTTP API reports it)."""
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def __reduce__(self):  # crosses Ray (replica -> proxy) intact
        return (type(self), (self.code, self.message, self.param))

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, param)
