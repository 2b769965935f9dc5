from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cli.main import main as cli_main
from folding import fold_onnx
from folding.export import FoldRequest, build_entry, example_input
from folding.verify import VerifyOptions, ort_session, verify_entry
from foldserve.entry import read_fold_report
from foldserve.records import CheckpointMeta
from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.models import ARCHITECTURES
from trainer.train import TrainConfig, train


@pytest.fixture(scope="module")
def entry(digits_run, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    result = build_entry(FoldRequest(digits_run / "checkpoint.pt", repo, "digits", 1))
    return result


def test_repository_entry_in_triton_layout(entry, digits_run):
    vdir = entry.version_dir
    assert vdir == entry.model_dir / "1"
    for f in ("model.onnx", "reference.onnx", "source.pt", "fold_report.json", "preprocess.json", "labels.txt",
              "verification.json"):
        assert (vdir / f).is_file(), f
    cfg = (entry.model_dir / "config.pbtxt").read_text()
    for needle in ('name: "digits"', 'platform: "onnxruntime_onnx"', "max_batch_size: 64", 'name: "input"',
                   "data_type: TYPE_FP32", "dims: [1, 8, 8]", "dims: [10]", "dynamic_batching",
                   "max_queue_delay_microseconds", 'label_filename: "labels.txt"'):
        assert needle in cfg, needle
    # and it is what the ModelConfig message reads back (text format, not a template)
    from foldserve.model_config import interface, read_config

    mbs, inputs, outputs = interface(read_config(entry.model_dir))
    assert (mbs, [(t.name, t.datatype, t.dims) for t in inputs + outputs]) == (
        64, [("input", "FP32", (1, 8, 8)), ("output", "FP32", (10,))])
    served = onnx.load(str(vdir / "model.onnx"))
    reference = onnx.load(str(vdir / "reference.onnx"))
    onnx.checker.check_model(served, full_check=True)
    assert next(o.version for o in served.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert served.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    props = {p.key: p.value for p in served.metadata_props}
    assert props["bn_folded"] == "9" and len(props["source_sha256"]) == 64 and props["foldserve_version"]
    # our pass did the folding: the reference keeps every BN, the served model has none
    assert sum(n.op_type == "BatchNormalization" for n in reference.graph.node) == 9
    assert sum(n.op_type == "BatchNormalization" for n in served.graph.node) == 0
    # onnxruntime loads it and it matches the checkpoint's eval outputs
    ckpt = load_checkpoint(digits_run / "checkpoint.pt")
    model = model_from_checkpoint(ckpt)
    x = example_input(CheckpointMeta.of(ckpt), 11, seed=5)
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort_session(vdir / "model.onnx", "all").run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (entry.model_dir / "labels.txt").read_text().split() == [str(i) for i in range(10)]


def test_verification_report_fields_and_round_trip(entry):
    report = json.loads((entry.version_dir / "verification.json").read_text())
    assert report["passed"] is True
    assert json.loads(json.dumps(report)) == report
    for name in ("unfolded_torch", "folded_torch", "reference_onnx", "served_onnx"):
        c = report["candidates"][name]
        for key in ("max_abs", "max_rel", "mean_abs", "worst", "frac_over", "top1_agreement", "passed"):
            assert key in c, (name, key)
        assert c["top1_agreement"] == 1.0
    assert set(report["inputs"]) >= {"random_b1", "random_b7", "random_b32", "validation"}
    assert report["accuracy"]["served_onnx"] == report["accuracy"]["reference_float64"]
    assert report["accuracy"]["served_onnx"] > 0.8
    assert all(v["passed"] for v in report["batch_invariance"].values())
    assert report["tolerance"]["rtol"] > 0 and report["provider"] == "CPUExecutionProvider"


def _copy_entry(entry, tmp_path) -> Path:
    dst = tmp_path / "entry"
    shutil.copytree(entry.version_dir, dst)
    return dst


def test_verifier_fails_and_localises_a_one_percent_channel_error(entry, tmp_path, capsys):
    vdir = _copy_entry(entry, tmp_path)
    served = onnx.load(str(vdir / "model.onnx"))
    target = read_fold_report(vdir).onnx.folded[3]  # a conv in the middle of the net
    node = next(n for n in served.graph.node if n.name == target.into)
    w = next(t for t in served.graph.initializer if t.name == node.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr[0] *= 1.01
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    onnx.save(served, str(vdir / "model.onnx"))
    code = cli_main(["--log-level", "ERROR", "verify", str(vdir)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"first layer over tolerance: {target.into}" in out
    # the passing report of the bytes that were verified stays; the failing one is written beside it
    assert json.loads((vdir / "verification.json").read_text())["passed"] is True
    assert "verification.failed.json" in out
    saved = json.loads((vdir / "verification.failed.json").read_text())
    assert saved["passed"] is False and saved["localization"]["first_failing_layer"] == target.into
    # the layers before it were fine
    sites = saved["localization"]["sites"]
    first_bad = next(i for i, s in enumerate(sites) if not s["passed"])
    assert sites[first_bad]["layer"] == target.into and all(s["passed"] for s in sites[:first_bad])


def test_verifier_fails_a_fold_with_the_wrong_eps(entry, tmp_path):
    vdir = _copy_entry(entry, tmp_path)
    reference = onnx.load(str(vdir / "reference.onnx"))
    for n in reference.graph.node:
        if n.op_type == "BatchNormalization":
            for a in n.attribute:
                if a.name == "epsilon":
                    a.f = 1e-3
    wrong, _ = fold_onnx(reference)
    onnx.save(wrong, str(vdir / "model.onnx"))
    report = verify_entry(vdir, VerifyOptions())
    assert report.passed is False
    assert not report.candidates["served_onnx"].passed
    assert report.candidates["folded_torch"].passed  # the torch fold (right eps) still passes


@pytest.mark.parametrize("sizes", [(1, 7, 32), (8,)], ids=["prefix-sets", "one-set"])
def test_batch_invariance_catches_a_train_mode_export(entry, tmp_path, sizes):
    """With several batch sizes, the same samples alone and inside the larger batches are compared (no extra
    runs); with one, each sample is also run alone."""
    vdir = _copy_entry(entry, tmp_path)
    ckpt = load_checkpoint(vdir / "source.pt")
    model = model_from_checkpoint(ckpt).train()
    import io

    buf = io.BytesIO()
    torch.onnx.export(model, (example_input(CheckpointMeta.of(ckpt), 4),), buf, dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False, input_names=["input"], output_names=["output"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    (vdir / "model.onnx").write_bytes(buf.getvalue())
    report = verify_entry(vdir, VerifyOptions(batch_sizes=sizes))
    assert report.passed is False
    assert not report.batch_invariance["served_onnx"].passed
    assert "batch invariance failed" in (report.failure or "")


def test_batch_invariance_catches_track_running_stats_false():
    from folding.tolerances import TOLERANCES
    from folding.verify import batch_invariance

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = np.random.default_rng(0).normal(size=(8, 1, 6, 6)).astype(np.float32)
    def run(feed):
        a = feed["x"]
        y = model(torch.from_numpy(a)).numpy() if len(a) > 1 else model(torch.from_numpy(np.concatenate([a, a]))).numpy()
        return {"y": y[:len(a)]}

    with torch.no_grad():
        c = batch_invariance(run, {"x": x}, TOLERANCES["float32"])
    assert not c.passed


def test_verify_bad_usage_exits_2(tmp_path, capsys):
    assert cli_main(["--log-level", "ERROR", "verify", str(tmp_path)]) == 2
    assert "not a repository version" in capsys.readouterr().err


def test_fold_onnx_cli(entry, tmp_path, capsys):
    out = tmp_path / "folded.onnx"
    code = cli_main(["--log-level", "ERROR", "fold", "--onnx", str(entry.version_dir / "reference.onnx"),
                     "--out", str(out)])
    assert code == 0
    assert "folded 9 BN" in capsys.readouterr().out
    folded = onnx.load(str(out))
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert cli_main(["--log-level", "ERROR", "fold", "--onnx", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_existing_version_is_not_overwritten(entry, digits_run, capsys):
    code = cli_main(["--log-level", "ERROR", "fold", str(digits_run), "--repository", str(entry.model_dir.parent),
                     "--name", "digits", "--version", "1"])
    assert code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("placement", ["before", "after"])
def test_verifier_passes_every_trainer_architecture(arch, placement, tmp_path):
    result = train(TrainConfig(arch=arch, dataset="synthetic", epochs=1, out=str(tmp_path / "run"),
                               bn_placement=placement, progress=False))
    entry = build_entry(FoldRequest(result.checkpoint, tmp_path / "repo", "m", 1,
                                    verify_options=VerifyOptions(batch_sizes=(1, 5))))
    assert entry.verification is not None and entry.verification.passed, entry.verification
    if placement == "before":
        assert entry.onnx_report.bn_after == 0
