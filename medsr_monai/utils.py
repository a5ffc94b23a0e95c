"""Small helpers shared across subpackages."""

from __future__ import annotations

__all__ = ["as_bool"]

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def as_bool(value: bool | int | str, name: str = "value") -> bool:
    """A config flag as a bool. ``python -m monai.bundle run ... --resume false`` passes the *string* ``"false"``
    (Python Fire only parses ``False``), which plain ``bool()`` would read as true.

    Example:
        >>> as_bool("false"), as_bool(True), as_bool("1")
        (False, True, True)
    """
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE or v in _FALSE:
            return v in _TRUE
        raise ValueError(f"{name} must be a boolean (true/false), got {value!r}")
    return bool(value)
