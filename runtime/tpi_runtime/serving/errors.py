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


_UNION_MEMBERS = {"str", "int", "float", "bool"}  # pydantic's loc tags of a union's plain members


def from_validation(e: ValidationError) -> ApiError:
    """The first field pydantic found wrong, as a 400 naming it. A union field (``prompt``: a string
    or token ids; ``stop``: a string or a list) fails once per member; the error reported is the
    first that is not a mere wrong type of a member, so a prompt of [-1] says "greater than or
    equal to 0" at ``prompt.0``, not "should be a valid string", and a stop of [null] names
    ``stop.0``."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first['msg']}", None, "invalid_json")
    if not first.get("loc"):
        return bad_request("request body must be a JSON object", None, "invalid_type")
    field = [x for x in errors if x.get("loc") and x["loc"][0] == first["loc"][0]]
    # Wrong types only: the deepest (a list's bad element, not the "should be a string" of its union).
    best = next((x for x in field if not x["type"].endswith("_type")), max(field, key=lambda x: len(x["loc"])))
    # Union members' tags ('str', 'list[constrained-int]', ...) are no place in the request body.
    loc = [x for x in best["loc"] if not (isinstance(x, str) and ("[" in x or x in _UNION_MEMBERS))]
    where = ".".join(str(x) for x in loc)
    code = "missing_required_parameter" if best["type"] == "missing" else "invalid_value"
    return bad_request(f"'{where}': {best['msg']}", str(loc[0]), code)
