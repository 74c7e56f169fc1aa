"""One error type for every refusal the API makes, so each one says what to fix in the same shape:
`{"error": {"message", "type", "code", "param"}, "detail": message}` with the right status code."""
from __future__ import annotations

from typing import Any

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "conflict_error", 410: "gone_error", 413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def __reduce__(self):  # crosses Ray's process boundary intact (handle callers get it back)
        return (type(self), (self.status, self.message, self.code, self.param, self.headers))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "api_error"), "code": self.code,
                          "param": self.param}, "detail": self.message}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"no {what} with id {ident!r}", f"{what}_not_found")
