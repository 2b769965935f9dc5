"""Model names: one rule for the folding stage (folder names it writes) and the server (names it serves)."""
from __future__ import annotations

NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
RULE = "use letters, digits, '_', '-' and '.' (no path separators, not starting with '.')"


def is_valid_model_name(name: str) -> bool:
    """A name that is safe as one folder of a model repository: no '..', '/', absolute or hidden paths."""
    return bool(name) and not name.startswith(".") and set(name) <= NAME_CHARS
