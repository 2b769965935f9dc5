"""What ``foldserve fold``'s text flags mean: ``--input-shape [NAME:]C,H,W`` and ``--normalize
[NAME:]MEAN,..:STD,..`` (repeatable, one per input) parsed into the library's ``Options`` tables."""
from __future__ import annotations

import numpy as np

from folding.programs import Norm
from foldserve.errors import ConfigError


def parse_shape(text: str | None, flag: str = "--input-shape") -> list[int] | None:
    if not text:
        return None
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected positive integers per sample, e.g. 3,224,224") from None
    if not dims or min(dims) < 1:
        raise ConfigError(f"{flag} {text!r}: expected positive integers per sample, e.g. 3,224,224")
    return dims


def _split_name(text: str, parts_without_name: int) -> tuple[str, str]:
    """``NAME:rest`` -> (NAME, rest) when the text has one more ``:``-part than the unnamed form."""
    if text.count(":") == parts_without_name:
        name, rest = text.split(":", 1)
        return name.strip(), rest
    return "", text


def parse_shapes(texts: list[str] | str | None) -> dict[str, list[int]] | None:
    """``--input-shape [NAME:]C,H,W`` (repeatable: one per input of a model with several)."""
    if not texts:
        return None
    out: dict[str, list[int]] = {}
    for text in [texts] if isinstance(texts, str) else texts:
        name, dims = _split_name(text, 1)
        if name in out:
            raise ConfigError(f"--input-shape given twice for {'input ' + repr(name) if name else 'the input'}")
        out[name] = parse_shape(dims) or []
    return out


def parse_normalize(text: str | None) -> Norm | None:
    """``MEAN,..:STD,..`` -> {"mean": [...], "std": [...]} (one value per channel, or one for all)."""
    if not text:
        return None
    try:
        mean_s, std_s = text.split(":")
        mean = [float(v) for v in mean_s.split(",")]
        std = [float(v) for v in std_s.split(",")]
    except ValueError:
        raise ConfigError(f"--normalize {text!r}: expected [NAME:]MEAN,..:STD,.. e.g. "
                          f"0.485,0.456,0.406:0.229,0.224,0.225") from None
    if len(mean) != len(std) or not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise ConfigError(f"--normalize {text!r}: as many means as standard deviations, finite, std > 0")
    return {"mean": mean, "std": std}


def parse_normalizes(texts: list[str] | str | None) -> dict[str, Norm] | None:
    """``--normalize [NAME:]MEAN,..:STD,..`` (repeatable: one per input)."""
    if not texts:
        return None
    out: dict[str, Norm] = {}
    for text in [texts] if isinstance(texts, str) else texts:
        name, rest = _split_name(text, 2)
        if name in out:
            raise ConfigError(f"--normalize given twice for {'input ' + repr(name) if name else 'the input'}")
        out[name] = parse_normalize(rest) or {}
    return out
