"""Triton's logging extension: the server's log settings, read and changed at run time.

Settings (Triton's names and types): ``log_info``, ``log_warning``, ``log_error`` (bool: whether records of that
level are written), ``log_verbose_level`` (uint: > 0 writes DEBUG records too), ``log_format`` (``default`` or
``ISO8601``: the timestamp), ``log_file`` (foldserve logs to stderr only: ``""`` is the one value accepted).
Changes go through the coordinator, so every worker of a ``--workers N`` server applies them (and a replacement
worker starts with them). Unknown settings, wrong types and unsupported values are a 400 naming the setting.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from foldserve.errors import InvalidInput

FORMATS = ("default", "ISO8601")
DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ISO_DATEFMT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class LogSettings:
    log_file: str = ""
    log_info: bool = True
    log_warning: bool = True
    log_error: bool = True
    log_verbose_level: int = 0
    log_format: str = "default"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_TYPES: dict[str, type] = {"log_file": str, "log_info": bool, "log_warning": bool, "log_error": bool,
                           "log_verbose_level": int, "log_format": str}
_current: LogSettings | None = None


def current() -> LogSettings:
    """The settings in force (at first: what the root logger's level, from --log-level, lets through)."""
    global _current
    if _current is None:
        level = logging.getLogger().getEffectiveLevel()
        _current = LogSettings(log_info=level <= logging.INFO, log_warning=level <= logging.WARNING,
                               log_error=level <= logging.ERROR, log_verbose_level=int(level <= logging.DEBUG))
    return _current


def merged(updates: Any) -> LogSettings:
    """The settings after ``updates`` (a JSON object), checked; the current ones are not changed."""
    if not isinstance(updates, dict):
        raise InvalidInput(f"log settings must be a JSON object of settings, got {type(updates).__name__}")
    values = current().to_json()
    for key, value in updates.items():
        kind = _TYPES.get(key)
        if kind is None:
            raise InvalidInput(f"unknown log setting {key!r}; the settings are {sorted(_TYPES)}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidInput(f"log setting {key!r} must be a non-negative integer, got {value!r}")
        if kind is not int and not isinstance(value, kind):
            raise InvalidInput(f"log setting {key!r} must be a {kind.__name__}, got {value!r}")
        values[key] = value
    if values["log_format"] not in FORMATS:
        raise InvalidInput(f"log setting 'log_format' must be one of {list(FORMATS)}, got {values['log_format']!r}")
    if values["log_file"]:
        raise InvalidInput("log file location can not be updated through network protocol (foldserve writes its "
                           "log to stderr only: collect it there; log_file takes only \"\")")
    return LogSettings(**values)


class _LevelToggle(logging.Filter):
    """Drops the records of the levels the settings switch off."""

    def filter(self, record: logging.LogRecord) -> bool:
        s = current()
        if record.levelno >= logging.ERROR:
            return s.log_error
        if record.levelno >= logging.WARNING:
            return s.log_warning
        if record.levelno >= logging.INFO:
            return s.log_info
        return s.log_verbose_level > 0


_TOGGLE = _LevelToggle()


def apply(settings: LogSettings) -> None:
    """Make ``settings`` the process's: level filter on every root handler, DEBUG when verbose, the format."""
    global _current
    root = logging.getLogger()
    _current = settings
    root.setLevel(logging.DEBUG if settings.log_verbose_level > 0 else logging.INFO)
    for handler in root.handlers:
        if _TOGGLE not in handler.filters:
            handler.addFilter(_TOGGLE)
        if settings.log_format == "ISO8601":
            formatter = logging.Formatter(DEFAULT_FORMAT, ISO_DATEFMT)
            formatter.converter = time.gmtime
        else:
            formatter = logging.Formatter(DEFAULT_FORMAT)
        handler.setFormatter(formatter)
