"""Reading a request body: capped in size, JSON, and checked field by field.

Every check names the field at fault (``messages[2].content``), so a bad request is a 400
that says what to fix, never a 500.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from .errors import ApiError

__all__ = ["Fields", "read_json"]


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "too_large",
        f"the request body is larger than {limit} bytes",
        code="request_too_large",
        retryable=False,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413 beyond). The guard (guard.py) has already
    read it within its deadline and the server's cap; this holds a route to its own."""
    body = await request.body()  # ClientDisconnect when the client went away
    if len(body) > limit:
        raise _too_large(limit)
    return body


async def read_json(request: Request, limit: int) -> Fields:
    """The body as a JSON object (400 for anything else)."""
    raw = await read_body(request, limit)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError.bad_param("body", "is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError.bad_param("body", f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError.bad_param("body", "must be a JSON object")
    if _MAYBE_SURROGATE.search(raw):
        _check_text(data)
    return Fields(data)


#: A ``\uD800``-``\uDFFF`` escape: the only way a lone surrogate gets into parsed JSON
#: (the raw bytes are valid UTF-8, which cannot encode one). Rarely present, so the walk
#: below runs only then.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_text(data: Any) -> None:
    """400 naming the first string (or key) holding a lone surrogate: text the model's
    tokenizer cannot take, which is the client's mistake, not the server's."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError.bad_param(
                    path or "body", f"is not valid text (a lone surrogate at position {exc.start})"
                ) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                stack.append((key, path or "body"))
                stack.append((item, where))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Fields:
    """A JSON object whose fields are read with checks; errors name ``path`` + field."""

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        self.data = data
        self.path = path

    def name(self, field: str) -> str:
        return f"{self.path}.{field}" if self.path else field

    def bad(self, field: str, reason: str) -> ApiError:
        return ApiError.bad_param(self.name(field), reason)

    def has(self, field: str) -> bool:
        return self.data.get(field) is not None

    def get(self, field: str) -> Any:
        return self.data.get(field)

    def _expect(self, field: str, what: str) -> ApiError:
        return self.bad(field, f"must be {what}, got {_kind(self.data.get(field))}")

    def text(self, field: str, *, required: bool = False, empty: bool = True) -> str | None:
        value = self.data.get(field)
        if value is None:
            if required:
                raise self.bad(field, "is required")
            return None
        if not isinstance(value, str):
            raise self._expect(field, "a string")
        if not empty and not value:
            raise self.bad(field, "must not be empty")
        return value

    def req_text(self, field: str) -> str:
        value = self.text(field, required=True, empty=False)
        assert value is not None
        return value

    def flag(self, field: str, default: bool = False) -> bool:
        value = self.data.get(field)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._expect(field, "true or false")
        return value

    def integer(
        self, field: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._expect(field, "an integer")
        if minimum is not None and value < minimum:
            raise self.bad(field, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.bad(field, f"must be <= {maximum}, got {value}")
        return value

    def number(
        self, field: str, *, minimum: float | None = None, maximum: float | None = None
    ) -> float | None:
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._expect(field, "a number")
        value = float(value)
        if not math.isfinite(value):
            raise self.bad(field, "must be finite")
        if minimum is not None and value < minimum:
            raise self.bad(field, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.bad(field, f"must be <= {maximum}, got {value}")
        return value

    def array(self, field: str, *, required: bool = False, empty: bool = True) -> list[Any] | None:
        value = self.data.get(field)
        if value is None:
            if required:
                raise self.bad(field, "is required")
            return None
        if not isinstance(value, list):
            raise self._expect(field, "an array")
        if not empty and not value:
            raise self.bad(field, "must not be empty")
        return value

    def obj(self, field: str, *, required: bool = False) -> Fields | None:
        value = self.data.get(field)
        if value is None:
            if required:
                raise self.bad(field, "is required")
            return None
        if not isinstance(value, dict):
            raise self._expect(field, "an object")
        return Fields(value, self.name(field))

    def item(self, field: str, index: int, value: Any) -> Fields:
        """Element ``index`` of array ``field``, which must be an object."""
        path = f"{self.name(field)}[{index}]"
        if not isinstance(value, dict):
            raise ApiError.bad_param(path, f"must be an object, got {_kind(value)}")
        return Fields(value, path)

    def strings(self, field: str) -> list[str] | None:
        """A string or an array of strings (``stop``)."""
        value = self.data.get(field)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise self._expect(field, "a string or an array of strings")
        for i, s in enumerate(value):
            if not isinstance(s, str):
                raise ApiError.bad_param(f"{self.name(field)}[{i}]", "must be a string")
        return list(value)

    def refuse(self, field: str, reason: str = "is not supported") -> None:
        """400 if ``field`` is present (and not null)."""
        if self.data.get(field) is not None:
            raise self.bad(field, reason)
