"""Typed reading of untrusted JSON bodies: every error names the field and changes nothing."""

from __future__ import annotations

from typing import Any

from hatchery.errors import HatcheryError


class BadRequest(HatcheryError):
    """The request is malformed; ``field`` names the culprit when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Body:
    """A JSON object from a request, read field by field; unknown fields are refused."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        self._data: dict[str, Any] = data
        self._seen: set[str] = set()

    def _get(self, name: str, required: bool) -> Any:
        self._seen.add(name)
        if name not in self._data or self._data[name] is None:
            if required:
                raise BadRequest(f"{name} is required", name)
            return None
        return self._data[name]

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
