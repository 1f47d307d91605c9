"""Errors returned to clients in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from http import HTTPStatus

from pydantic import ValidationError

from .protocol import ErrorBody, ErrorResponse


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers or {}
        self.counted = False  # True once tpi_requests_total has this request (the endpoint did it)

    def body(self) -> bytes:
        err = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=err).model_dump_json().encode()


def bad_request(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, param=param, code=code)


def unsupported(message: str, param: str, code: str = "unsupported_parameter") -> ApiError:
    """A valid OpenAI field this server cannot honour: refused, never silently ignored."""
    return ApiError(HTTPStatus.BAD_REQUEST, message, param=param, code=code)


def unavailable(message: str, code: str) -> ApiError:
    return ApiError(HTTPStatus.SERVICE_UNAVAILABLE, message, code=code, type_="service_unavailable")


def from_validation(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the top-level field."""
    first = e.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first['msg']}", None, "invalid_json")
    loc = first.get("loc") or ()
    if not loc:
        return bad_request("request body must be a JSON object", None, "invalid_type")
    param = str(loc[0])
    where = ".".join(str(x) for x in loc)
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return bad_request(f"'{where}': {first['msg']}", param, code)
