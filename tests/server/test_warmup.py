"""Model warm-up as Triton declares it (``model_warmup`` in config.pbtxt): fold writes one, the server runs
exactly what is declared before it serves, and a declared warm-up that cannot run fails the load with a
message naming the entry."""
from __future__ import annotations

import json
import shutil
import urllib.request

from google.protobuf import text_format

from foldserve.model_config import CONFIG_FILE, ModelConfig
from tests.server.conftest import ServerProcess, digits_batch


def _config(path) -> ModelConfig:
    return text_format.Parse((path / CONFIG_FILE).read_text(), ModelConfig())


def _write(path, config: ModelConfig) -> None:
    (path / CONFIG_FILE).write_text(text_format.MessageToString(config))


def test_fold_declares_a_warmup_of_random_inputs_at_batch_1_and_the_largest_batch(repository):
    config = _config(repository / "digits")
    entries = {w.name: w for w in config.model_warmup}
    assert [w.batch_size for w in entries.values()] == [1, config.max_batch_size]
    first = next(iter(entries.values()))
    assert first.count == 3 and first.inputs["input"].random_data and list(first.inputs["input"].dims) == [1, 8, 8]


def test_declared_warmup_runs_file_inputs_and_a_bad_entry_fails_the_load(repository, tmp_path):
    repo = tmp_path / "repo"
    for name in ("good", "bad_dims", "bad_file"):
        shutil.copytree(repository / "digits", repo / name)
        cfg = _config(repo / name)
        cfg.name = name
        del cfg.model_warmup[:]
        w = cfg.model_warmup.add(name="from file", batch_size=2, count=2)
        w.inputs["input"].data_type = cfg.input[0].data_type
        w.inputs["input"].dims.extend([1, 8, 8])
        w.inputs["input"].input_data_file = "two_digits.raw"
        if name == "bad_dims":
            w.inputs["input"].dims[:] = [1, 9, 9]
        (repo / name / "warmup").mkdir()
        data = digits_batch(2).tobytes()
        (repo / name / "warmup" / "two_digits.raw").write_bytes(data if name != "bad_file" else data[:-4])
        _write(repo / name, cfg)
    with ServerProcess(repo) as srv:
        assert srv.info["models"] == ["good:1"]
        log = srv.log()
        assert "warmed up good (from file x2)" in log
        with urllib.request.urlopen(urllib.request.Request(f"http://{srv.http}/v2/repository/index", data=b"",
                                                           method="POST")) as r:
            index = {m["name"]: m for m in json.loads(r.read())}
        assert "model_warmup 'from file'" in index["bad_dims"]["reason"] and "[1, 9, 9]" in index["bad_dims"]["reason"]
        assert "warmup/two_digits.raw has 508 bytes" in index["bad_file"]["reason"]
