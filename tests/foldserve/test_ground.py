"""The ground layer: the datatype table fails loudly, names/versions follow one rule, a version folder is
replaced so that one complete version always exists."""
from __future__ import annotations

import os

import numpy as np
import pytest

from foldserve.datatypes import TABLE, lookup
from foldserve.errors import UnsupportedDataType
from foldserve.names import parse_version
from foldserve.swap import OLD_PREFIX, STAGING_PREFIX, clean_leftovers, install_dir


def test_datatype_table_round_trips_and_refuses_unknown_types():
    for row in TABLE:
        for kind in ("v2", "onnx", "config", "ort"):
            assert lookup(getattr(row, kind), kind) is row
        if row.numpy is not None:
            assert lookup(row.numpy, "numpy") is row
    for kind, value in (("onnx", 99), ("v2", "FP8"), ("config", "TYPE_FP8"), ("ort", "tensor(float8e4m3fn)"),
                        ("numpy", np.complex64)):
        with pytest.raises(UnsupportedDataType, match="unknown"):
            lookup(value, kind, "input 'x'")


@pytest.mark.parametrize("text", ["01", "²", "①", "١", "-1", "1.0", " 1", "9" * 19])
def test_odd_versions_are_refused(text):
    with pytest.raises(ValueError):
        parse_version(text)


def test_versions_and_latest():
    assert parse_version("") is None and parse_version("7") == 7 and parse_version(12) == 12


def test_install_dir_replaces_a_version_and_a_kill_aside_is_recovered(tmp_path):
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_text("old")
    new = model / f"{STAGING_PREFIX}1-abc-{os.getpid()}"
    new.mkdir()
    (new / "model.onnx").write_text("new")
    install_dir(new, model / "1")
    assert (model / "1" / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in model.iterdir()) == ["1"]
    # a kill after the old folder was moved aside and before the new one was installed (fallback path):
    # the next fold puts the old version back, and removes staging folders of dead processes
    os.replace(model / "1", model / f"{OLD_PREFIX}1-999999999")
    (model / f"{STAGING_PREFIX}1-x-999999999").mkdir()
    clean_leftovers(model)
    assert sorted(p.name for p in model.iterdir()) == ["1"]
    assert (model / "1" / "model.onnx").read_text() == "new"
