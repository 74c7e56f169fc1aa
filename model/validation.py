"""Pydantic errors in words a user can act on: one line per bad key, `key = value: rule`.

One formatter for the whole repo (config files, the Serve app's args, HTTP request bodies), so a bad value
reads the same wherever it is caught; callers differ only in the header, the words for unknown keys and
which location parts (FastAPI's "body"/"query"/"path") mean nothing to their reader.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Mapping

from pydantic import ValidationError

Rewrite = Callable[[str, Mapping[str, Any]], "str | None"]  # (key, pydantic error) -> message, None: keep it


class ConfigError(ValueError):
    """A configuration value broke a rule; the message names key, value and rule."""


def error_lines(errors: ValidationError | Iterable[Mapping[str, Any]], *, root: str = "<config>",
                drop_loc: Collection[str] = (), show_input: bool = True, hide_input: Collection[str] = ("missing",),
                messages: Mapping[str, str] | None = None, rewrite: Rewrite | None = None) -> list[str]:
    """One line per pydantic error: `key = input: rule` (or `key: rule`; a rule across keys alone).

    root: the key shown when the location is empty after dropping `drop_loc` parts; show_input: print the
    offending value (never for the error types in hide_input); messages: error type -> the words to use
    instead of pydantic's (e.g. "extra_forbidden" -> "unknown key"); rewrite(key, error): a message for one
    error, or None to keep the default. Pydantic's "Value error, " prefix is dropped."""
    errs = errors.errors() if isinstance(errors, ValidationError) else list(errors)
    messages = messages or {}
    lines = []
    for e in errs:
        loc = tuple(e.get("loc", ()))
        key = ".".join(str(p) for p in loc if p not in drop_loc) or root
        kind = e.get("type", "")
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        msg = messages.get(kind, msg)
        if rewrite is not None:
            msg = rewrite(key, e) or msg
        if not loc:  # a rule across keys: its message names them
            lines.append(msg)
        elif show_input and "input" in e and kind not in hide_input:
            lines.append(f"{key} = {e['input']!r}: {msg}")
        else:
            lines.append(f"{key}: {msg}")
    return lines


def format_validation_error(errors: ValidationError | Iterable[Mapping[str, Any]], header: str, *,
                            one_line: bool = False, **rules: Any) -> str:
    """`header:` then the error_lines(errors, **rules): indented one per line, or "; "-joined (one_line)."""
    lines = error_lines(errors, **rules)
    return f"{header}: " + "; ".join(lines) if one_line else f"{header}:\n  " + "\n  ".join(lines)


def validated(cls, data: dict, where: str):
    """cls.model_validate(data), or a ConfigError that lists every bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"invalid {where}", messages={"extra_forbidden": "unknown key"})
                          ) from None
