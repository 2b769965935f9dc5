"""Bring your own model: ONNX files, torch.export programs and TorchScript files (networks written in the test,
not by the trainer) become folded, verified, served entries whose answers match the unfolded network."""
from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from foldserve.entry import read_fold_report
from tests.conftest import run_cli
from tests.folding.helpers import assert_close_to_scale, scale_layer_weights, torch64
from tests.zoo import mobilenet_v3_small, residual_net, resnet18

HW = 16
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _export_onnx(model: torch.nn.Module, path: Path, shape: tuple[int, ...], *, dynamic: dict | None = None,
                 names: tuple[str, str] = ("images", "logits")) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, do_constant_folding=False,
                          input_names=[names[0]], output_names=[names[1]], opset_version=17,
                          dynamic_axes=dynamic if dynamic is not None else {names[0]: {0: "b"}, names[1]: {0: "b"}})
    return path


def _save_pt2(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    ep = torch.export.export(model, (torch.randn(*shape),), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(ep, str(path))
    return path


def _save_torchscript(model: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.randn(*shape)), str(path))
    return path


def _bn_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _grpc_infer(client, model: str, in_name: str, out_name: str, x: np.ndarray) -> np.ndarray:
    """One request through tritonclient (the client users have; it and foldserve.client's stubs define the same
    protobuf symbols, so one test process uses one of them)."""
    import tritonclient.grpc as tgrpc

    inp = tgrpc.InferInput(in_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[tgrpc.InferRequestedOutput(out_name)]).as_numpy(out_name)


@pytest.fixture(scope="module")
def byom_repo(tmp_path_factory):
    """The hand-written residual net as ONNX, .pt2 and TorchScript, each folded by the CLI into one repository."""
    tmp = tmp_path_factory.mktemp("byom")
    model = residual_net()
    shape = (2, 3, HW, HW)
    files = {"rn_onnx": _export_onnx(model, tmp / "rn.onnx", shape),
             "rn_pt2": _save_pt2(model, tmp / "rn.pt2", shape),
             "rn_ts": _save_torchscript(model, tmp / "rn.pt", shape)}
    (tmp / "ext").mkdir()
    onnx.save(onnx.load(str(files["rn_onnx"])), str(tmp / "ext" / "rn_ext.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)
    files["rn_ext"] = tmp / "ext" / "rn_ext.onnx"
    repo = tmp / "repo"
    outputs = {}
    for name, f in files.items():
        extra = ["--input-shape", f"3,{HW},{HW}"] if name == "rn_ts" else []
        proc = run_cli("fold", str(f), "--repository", str(repo), "--name", name, "--batch-sizes", "1,5", *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs[name] = proc.stdout
    return {"repo": repo, "model": model, "files": files, "stdout": outputs, "tmp": tmp}


@pytest.mark.parametrize("name,kind", [("rn_onnx", "onnx"), ("rn_pt2", "pt2"), ("rn_ts", "torchscript"),
                                       ("rn_ext", "onnx")])
def test_each_kind_becomes_a_verified_entry_without_batchnorm(byom_repo, name, kind):
    vdir = byom_repo["repo"] / name / "1"
    record = json.loads((vdir / "source.json").read_text())
    report = json.loads((vdir / "verification.json").read_text())
    assert record["kind"] == kind and record["batch"] is None and record["input_shape"] == [3, HW, HW]
    assert report["passed"] and report["source"]["kind"] == kind
    assert _bn_count(vdir / "reference.onnx") == 5 and _bn_count(vdir / "model.onnx") == 0
    assert report["fold"] == {"bn_before": 5, "folded": 5, "skipped": 0, "bn_after": 0}
    # the torch programs are rerun as the truth in float64; an ONNX file is its own truth
    assert report["source"]["truth"] == ("float32" if kind == "onnx" else "float64")
    assert ("unfolded_torch" in report["candidates"]) == (kind != "onnx")
    assert "ConvTranspose" in byom_repo["stdout"][name]
    # an ONNX file with its weights beside it keeps that layout in the entry
    assert (vdir / "model.onnx.data").is_file() == (vdir / "reference.onnx.data").is_file() == (name == "rn_ext")


def test_served_answers_over_grpc_match_the_unfolded_network(byom_repo):
    from tests.server.conftest import ServerProcess

    x = np.random.default_rng(3).normal(size=(6, 3, HW, HW)).astype(np.float32)
    truth = torch64(byom_repo["model"], x)
    with ServerProcess(byom_repo["repo"]) as srv:
        import tritonclient.grpc as tgrpc

        client = tgrpc.InferenceServerClient(srv.grpc)
        for name, in_name, out_name in (("rn_onnx", "images", "logits"), ("rn_pt2", "x", "output"),
                                        ("rn_ts", "x", "output"), ("rn_ext", "images", "logits")):
            meta = client.get_model_metadata(name, as_json=True)
            assert (meta["inputs"][0]["name"], meta["outputs"][0]["name"]) == (in_name, out_name)
            assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 3, HW, HW]
            assert_close_to_scale(_grpc_infer(client, name, in_name, out_name, x), truth)
        client.close()
        live = run_cli("verify", "--server", srv.grpc, str(byom_repo["repo"] / "rn_pt2" / "1"), "--batch-sizes", "1,3")
        assert live.returncode == 0 and "PASSED" in live.stdout, live.stdout + live.stderr


def test_normalisation_is_baked_in_and_real_samples_give_accuracy(byom_repo, tmp_path):
    """--normalize: clients send raw data; --data: the report has the samples and their accuracy."""
    model = byom_repo["model"]
    raw = np.random.default_rng(4).normal(size=(40, 3, HW, HW)) * np.reshape(STD, (1, 3, 1, 1)) + \
        np.reshape(MEAN, (1, 3, 1, 1))
    normalized = (raw - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))
    labels = torch64(model, normalized).argmax(1)
    labels[:4] = (labels[:4] + 1) % 10                       # 36 of 40 right: accuracy 0.9
    np.savez(tmp_path / "val.npz", x=raw.astype(np.float32), y=labels)
    (tmp_path / "labels.txt").write_text("".join(f"class{i}\n" for i in range(10)))
    proc = run_cli("fold", str(byom_repo["files"]["rn_pt2"]), "--repository", str(tmp_path / "repo"), "--name", "norm",
                   "--normalize", ",".join(map(str, MEAN)) + ":" + ",".join(map(str, STD)), "--data",
                   str(tmp_path / "val.npz"), "--labels", str(tmp_path / "labels.txt"), "--batch-sizes", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    vdir = tmp_path / "repo" / "norm" / "1"
    report = json.loads((vdir / "verification.json").read_text())
    assert report["inputs"]["validation"] == [40, 3, HW, HW]
    assert report["accuracy"]["served_onnx"] == pytest.approx(0.9) == report["accuracy"]["reference_float64"]
    pre = json.loads((vdir / "preprocess.json").read_text())
    assert pre["normalization"] == {"mean": MEAN, "std": STD} and pre["class_names"][3] == "class3"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert_close_to_scale(sess.run(None, {"x": raw.astype(np.float32)})[0], torch64(model, normalized))
    assert 'label_filename: "labels.txt"' in (tmp_path / "repo" / "norm" / "config.pbtxt").read_text()


def test_symbolic_and_fixed_dimensions(byom_repo, tmp_path):
    """A symbolic H, W needs --input-shape (one line naming it); a fixed batch axis is served unbatched."""
    model = byom_repo["model"]
    spatial = _export_onnx(model, tmp_path / "spatial.onnx", (2, 3, HW, HW),
                           dynamic={"images": {0: "b", 2: "h", 3: "w"}, "logits": {0: "b"}})
    proc = run_cli("fold", str(spatial), "--repository", str(tmp_path / "repo"))
    assert proc.returncode == 2 and "--input-shape" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_cli("fold", str(spatial), "--repository", str(tmp_path / "repo"), "--input-shape", "3,24,20",
                   "--batch-sizes", "1,3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dims: [3, -1, -1]" in (tmp_path / "repo" / "spatial" / "config.pbtxt").read_text()

    fixed = _export_onnx(model, tmp_path / "fixed.onnx", (2, 3, HW, HW), dynamic={})
    proc = run_cli("fold", str(fixed), "--repository", str(tmp_path / "repo"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = (tmp_path / "repo" / "fixed" / "config.pbtxt").read_text()
    assert "max_batch_size" not in config and "dims: [2, 3, 16, 16]" in config
    report = json.loads((tmp_path / "repo" / "fixed" / "1" / "verification.json").read_text())
    assert report["passed"] and report["source"]["batch"] == 2


def test_a_broken_fold_of_a_user_model_is_caught_and_localised(byom_repo, tmp_path):
    """Scale one folded conv's weights in the served file: verification fails and names that layer."""
    from folding.verify import VerifyOptions, verify_entry

    vdir = tmp_path / "rn_pt2" / "1"
    shutil.copytree(byom_repo["repo"] / "rn_pt2" / "1", vdir)
    folds = read_fold_report(vdir).onnx.folded
    target = next(f for f in folds if f.producer_type == "ConvTranspose")
    scale_layer_weights(vdir / "model.onnx", target.into)
    report = verify_entry(vdir, VerifyOptions(batch_sizes=(2,), write=False))
    assert not report.passed and report.candidates["unfolded_torch"].passed
    assert report.localization.first_failing_layer == target.into


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _other_torch_pt2(src: Path, dst: Path) -> Path:
    """The same program with the serialisation schema of a future torch (major version + 1)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("models/model.json"):
                doc = json.loads(data)
                doc["schema_version"]["major"] += 1
                data = json.dumps(doc).encode()
            zout.writestr(item, data)
    return dst


@pytest.mark.parametrize("make,expected", [
    (lambda f, t: _truncate(f["rn_onnx"], t / "cut.onnx"), "not a foldserve checkpoint, an ONNX model"),
    (lambda f, t: _truncate(f["rn_pt2"], t / "cut.pt2"), "damaged zip archive"),
    (lambda f, t: _other_torch_pt2(f["rn_pt2"], t / "future.pt2"), "export schema 9.20"),
    (lambda f, t: (torch.save({"weights": torch.ones(3)}, t / "dict.pt"), t / "dict.pt")[1], "not a foldserve checkpoint"),
    (lambda f, t: (torch.save(residual_net(), t / "whole.pt"), t / "whole.pt")[1], "torch.export.save"),
    (lambda f, t: ((t / "notes.txt").write_text("hello\n" * 100), t / "notes.txt")[1], "an ONNX model (.onnx)"),
], ids=["truncated-onnx", "truncated-pt2", "pt2-of-another-torch", "pickle-not-a-module", "pickled-module", "text"])
def test_bad_files_get_one_line_and_exit_2(byom_repo, tmp_path, make, expected):
    bad = make(byom_repo["files"], tmp_path)
    proc = run_cli("fold", str(bad), "--repository", str(tmp_path / "repo"), "--name", "bad")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert expected in proc.stderr and bad.name in proc.stderr
    assert not (tmp_path / "repo" / "bad").exists()


@pytest.mark.slow
def test_acceptance_resnet18_onnx_and_mobilenet_v3_small_pt2(tmp_path):
    """A ResNet-18 exported to ONNX and a MobileNetV3-small saved with torch.export.save (random BN statistics)
    become entries with no BatchNormalization left; verify passes; the served answer matches torch's unfolded
    output to 1e-4 of its scale."""
    from tests.server.conftest import ServerProcess

    r18, mnv3 = resnet18(), mobilenet_v3_small()
    shape = (1, 3, 224, 224)
    files = {"r18": _export_onnx(r18, tmp_path / "resnet18.onnx", shape, names=("input", "logits")),
             "mnv3": _save_pt2(mnv3, tmp_path / "mobilenet_v3_small.pt2", (2, 3, 224, 224))}
    repo = tmp_path / "repo"
    for name, f in files.items():
        proc = run_cli("fold", str(f), "--repository", str(repo), "--name", name, "--batch-sizes", "1,4")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _bn_count(repo / name / "1" / "model.onnx") == 0
        assert _bn_count(repo / name / "1" / "reference.onnx") == (20 if name == "r18" else 34)
        proc = run_cli("verify", str(repo / name / "1"), "--batch-sizes", "2")
        assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stdout + proc.stderr
    x = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)
    with ServerProcess(repo) as srv:
        import tritonclient.grpc as tgrpc

        client = tgrpc.InferenceServerClient(srv.grpc)
        assert_close_to_scale(_grpc_infer(client, "r18", "input", "logits", x), torch64(r18, x))
        assert_close_to_scale(_grpc_infer(client, "mnv3", "x", "output", x), torch64(mnv3, x))
        client.close()

