"""Model names and version numbers: one rule for the folding stage (folders it writes), the server (names
it serves) and the clients."""
from __future__ import annotations

NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
MAX_NAME_LENGTH = 128
RULE = (f"use letters, digits, '_', '-' and '.' (at most {MAX_NAME_LENGTH} characters, no path separators, "
        f"not starting with '.')")
MAX_VERSION_DIGITS = 18
VERSION_RULE = f"expected a positive integer in ASCII digits (at most {MAX_VERSION_DIGITS} digits, no leading zero)"


def is_valid_model_name(name: str) -> bool:
    """A name that is safe as one folder of a model repository: no '..', '/', absolute or hidden paths."""
    return bool(name) and len(name) <= MAX_NAME_LENGTH and not name.startswith(".") and set(name) <= NAME_CHARS


def parse_version(text: str | int | None) -> int | None:
    """A version number from text: None for "" (the latest), the number for canonical ASCII digits, and a
    ValueError for anything else ('01', '²', '١' and '-1' are not versions)."""
    if text is None or text == "":
        return None
    s = str(text)
    if not (s.isascii() and s.isdigit()) or len(s) > MAX_VERSION_DIGITS or s[0] == "0":
        raise ValueError(f"version {s!r}: {VERSION_RULE}")
    return int(s)


def is_version_folder(name: str) -> bool:
    try:
        return parse_version(name) is not None
    except ValueError:
        return False
