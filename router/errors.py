"""The request plane's error type: a gRPC status code plus a message that says what to fix."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):  # crosses Ray (replica -> proxy) intact
        return (type(self), (self.code, self.message))


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)
