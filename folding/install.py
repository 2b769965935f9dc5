"""Installing a version into a model repository: names and version numbers, the check that a new version keeps
the model's interface and labels, and the staged, atomic install (:mod:`foldserve.swap`): a version folder is
assembled and verified in a staging folder and swapped into place, so a reader never sees half an entry and a
kill never leaves a model without its version.
"""
from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from foldserve.atomic import write_text
from foldserve.entry import LABELS_FILE, next_version, read_labels, read_precision, version_numbers
from foldserve.errors import ConfigError, WriteError
from foldserve.model_config import CONFIG_FILE, Interface, ModelConfig, interface, read_config, write_config
from foldserve.names import RULE, is_valid_model_name
from foldserve.swap import clean_leftovers, install_dir, staging_dir

T = TypeVar("T")


def check_model_name(name: str) -> str:
    if not is_valid_model_name(name):
        raise ConfigError(f"model name {name!r}: {RULE}")
    return name


def check_version(model_dir: Path, name: str, version: int | None, force: bool) -> int:
    """The version to write (the next free one by default); an existing one only with --force."""
    version = version if version is not None else next_version(model_dir)
    if version < 1:
        raise ConfigError(f"FoldRequest.version must be >= 1, got {version}")
    if (model_dir / str(version)).exists() and not force:
        raise ConfigError(f"{name}/{version} already exists; choose another FoldRequest.version or pass "
                          "FoldRequest.force")
    return version


def check_compatible(model_dir: Path, config: ModelConfig, labels: list[str], replacing: int) -> None:
    """Refuse a version whose interface or labels differ from the model's other versions: they would stay READY
    and fail every request."""
    others = [v for v in version_numbers(model_dir) if v != replacing]
    if not others or not (model_dir / CONFIG_FILE).is_file():
        return
    old, new, old_labels = interface(read_config(model_dir)), interface(config), read_labels(model_dir)
    what = None
    if old != new:
        what = f"its interface (max_batch_size, inputs, outputs) {_fmt(old)}; this model's is {_fmt(new)}"
    elif old_labels != labels:
        what = f"{len(old_labels)} labels; this model has {len(labels)} other ones"
    if what:
        raise ConfigError(f"model {model_dir.name!r} (versions {others}) has {what}: its versions would stop "
                          f"working; fold it under a new FoldRequest.name")


def _fmt(iface: Interface) -> str:
    mbs, ins, outs = iface
    return f"{mbs}, " + ", ".join(f"{t.name} {t.datatype} {list(t.dims)}" for t in ins + outs)


def model_precision(model_dir: Path, version: int, precision: str) -> str:
    """config.pbtxt's foldserve_precision: the precision of every version, or "mixed" (each version's
    precision.json, and the config the server serves per version, say which)."""
    others = {read_precision(model_dir / str(v)).precision for v in version_numbers(model_dir) if v != version}
    return precision if others <= {precision} else "mixed"


REJECTED_PREFIX = ".rejected-"


def rejected_dir(version_dir: Path) -> Path:
    """Where a version that failed its check is kept for inspection: ``NAME/.rejected-VERSION``, beside the versions
    and invisible to a server (not a version number; the model's config is not written for it)."""
    return version_dir.parent / f"{REJECTED_PREFIX}{version_dir.name}"


def install(model_dir: Path, version_dir: Path, config: ModelConfig, labels: list[str],
            write_and_check: Callable[[Path], T], accept: Callable[[T], bool] = lambda _: True) -> T:
    """Stage the version (``write_and_check(staging)`` writes its files and verifies them), swap it into place,
    then write the model's shared files. A first version interrupted on the way leaves no empty model folder. A
    version that ``accept`` refuses (a failed verification) is not installed: the repository stays as it was and
    the staged version is kept at :func:`rejected_dir` (replacing an older rejected one)."""
    created = not model_dir.exists()
    try:
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            clean_leftovers(model_dir)
            staging = staging_dir(model_dir, version_dir.name)
        except OSError as exc:
            raise WriteError(write_failure(exc, model_dir)) from None
        try:
            result = write_and_check(staging)
            if not accept(result):
                install_dir(staging, rejected_dir(version_dir))
                return result
            stale = rejected_dir(version_dir)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            install_dir(staging, version_dir)
            if labels:
                write_text(model_dir / LABELS_FILE, "\n".join(labels) + "\n")
            write_config(model_dir, config)
            return result
        except OSError as exc:
            raise WriteError(write_failure(exc, model_dir)) from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if created and not version_numbers(model_dir):
            shutil.rmtree(model_dir, ignore_errors=True)
        raise


def write_failure(exc: OSError, where: Path) -> str:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
    return f"cannot write the entry in {where.name!r}: {reason}; the repository is unchanged"
