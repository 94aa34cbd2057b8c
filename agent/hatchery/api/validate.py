"""Typed reading of untrusted JSON bodies: every error names the field and changes nothing.

Pure (no HTTP here): ``api.http`` reads the bytes under a size limit, ``Body.parse`` turns
them into a ``Body`` and each handler takes the fields it knows, then calls ``finish`` so a
misspelt or unexpected field is a 400 rather than silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hatchery.errors import HatcheryError


class BadRequest(HatcheryError):
    """The request is malformed; ``field`` names the culprit when there is one."""

    def __init__(self, message: str, field: str | None = None, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field


class Body:
    """A JSON object from a request, read field by field; unknown fields are refused."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        self._data: dict[str, Any] = data
        self._seen: set[str] = set()

    @classmethod
    def parse(cls, raw: bytes) -> Body:
        """The JSON object in ``raw``; anything else (bad UTF-8, bad JSON, a list) is a 400."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        return cls(data)

    def peek(self, name: str) -> Any:
        """The raw value of ``name`` without reading it (the permission guard's look at
        ``owner_group`` before the handler validates the body)."""
        return self._data.get(name)

    def _get(self, name: str, required: bool) -> Any:
        self._seen.add(name)
        if name not in self._data or self._data[name] is None:
            if required:
                raise BadRequest(f"{name} is required", name)
            return None
        return self._data[name]

    def value(self, name: str, *, required: bool = False) -> Any:
        """The raw JSON value of ``name`` (None when absent), for a field that has its own
        parser (a VM source: a string or an object)."""
        return self._get(name, required)

    def text(
        self, name: str, *, required: bool = False, default: str | None = None, max_len: int = 255
    ) -> str | None:
        value = self._get(name, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string", name)
        if len(value) > max_len:
            raise BadRequest(f"{name} is longer than {max_len} characters", name)
        if "\x00" in value:
            raise BadRequest(f"{name} contains a NUL character", name)
        return value

    def choice(self, name: str, choices: Sequence[str], *, default: str) -> str:
        """One of ``choices``; the refusal lists them all, so the caller can pick one."""
        value = self.text(name, default=default)
        assert value is not None
        if value not in choices:
            raise BadRequest(f"{name} must be one of {', '.join(choices)}, not {value!r}", name)
        return value

    def integer(self, name: str, *, default: int, low: int, high: int) -> int:
        value = self._get(name, False)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"{name} must be an integer", name)
        if not low <= value <= high:
            raise BadRequest(f"{name} must be between {low} and {high}, got {value}", name)
        return value

    def flag(self, name: str, *, default: bool) -> bool:
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false", name)
        return value

    def obj(self, name: str) -> Body | None:
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise BadRequest(f"{name} must be an object", name)
        return Body(value)

    def mapping(self, name: str, max_items: int = 32) -> dict[str, str]:
        value = self._get(name, False)
        if value is None:
            return {}
        if not isinstance(value, dict) or len(value) > max_items:
            raise BadRequest(f"{name} must be an object of at most {max_items} strings", name)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise BadRequest(f"{name} must map strings to strings", name)
        return dict(value)

    def text_list(self, name: str, *, max_items: int, max_len: int) -> tuple[str, ...]:
        value = self._get(name, False)
        if value is None:
            return ()
        if not isinstance(value, list) or len(value) > max_items:
            raise BadRequest(f"{name} must be a list of at most {max_items} strings", name)
        for item in value:
            if not isinstance(item, str) or len(item) > max_len or "\x00" in item:
                raise BadRequest(f"{name} must hold strings of at most {max_len} characters", name)
        return tuple(value)

    def finish(self, prefix: str = "") -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise BadRequest(f"unknown field {prefix}{unknown[0]}", prefix + unknown[0])
