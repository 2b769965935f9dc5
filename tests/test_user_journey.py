"""The new-user journey (issue 16): each test reproduces what a new user ran into and fails on the old code."""
from __future__ import annotations

import csv
import shutil
import socket

import numpy as np
import pytest

from cli.main import main as cli_main
from tests.conftest import run_cli


def _one_line_error(capsys, *args: str, code: int = 2) -> str:
    got = cli_main(["--log-level", "ERROR", *args])
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_precise_bn_metrics_land_in_the_csv_at_any_epoch_count(tmp_path, epochs):
    from trainer.train import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(arch="mlp", dataset="synthetic", out=str(out), epochs=epochs, precise_bn=5, progress=False))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == epochs
    assert rows[-1]["precise_bn_val_acc"] not in ("", None)          # the precise-BN metrics, last row
    assert all(r["precise_bn_val_acc"] == "" for r in rows[:-1])     # earlier rows have the column empty
    assert (out / "curves.png").stat().st_size > 0


def test_train_out_at_a_file_or_unwritable_place_is_one_line(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert "not a directory" in _one_line_error(capsys, "train", "--dataset", "synthetic", "--out", str(f))
    assert "not a directory" in _one_line_error(capsys, "train", "--dataset", "synthetic", "--out", str(f / "sub"))


def test_list_archs_exists(capsys):
    assert cli_main(["train", "--list-archs"]) == 0
    out = capsys.readouterr().out
    assert "resnet20" in out and "encdec" in out and "denoising" in out


def test_fold_onnx_refuses_overwriting_its_input_and_a_repository(repository, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    shutil.copy(repository / "digits" / "1" / "reference.onnx", src)
    before = src.read_bytes()
    assert "input file" in _one_line_error(capsys, "fold", "--onnx", str(src), "--out", str(src))
    assert src.read_bytes() == before
    err = _one_line_error(capsys, "fold", "--onnx", str(src), "--out", str(tmp_path / "o.onnx"), "--repository",
                          str(tmp_path / "r"))
    assert "--repository" in err and not (tmp_path / "o.onnx").exists()


def test_a_differently_shaped_model_under_an_existing_name_is_refused(repository, tmp_path, capsys):
    from trainer.train import TrainConfig, train

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    config_before = (repo / "digits" / "config.pbtxt").read_text()
    run = train(TrainConfig(arch="resnet", dataset="synthetic", out=str(tmp_path / "syn"), epochs=1, progress=False,
                            arch_args={"width": 4}))
    # synthetic data has another input shape than digits' 1x8x8
    err = _one_line_error(capsys, "fold", str(run.checkpoint), "--repository", str(repo), "--name", "digits")
    assert "new --name" in err
    assert (repo / "digits" / "config.pbtxt").read_text() == config_before
    assert sorted(p.name for p in (repo / "digits").iterdir() if p.is_dir()) == ["1"]


def _taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


@pytest.mark.subprocess
def test_a_taken_port_is_one_line_and_exit_2_before_loading(repository, tmp_path):
    s, port = _taken_port()
    with s:
        for flags in (["--http-port", str(port), "--grpc-port", "0"], ["--grpc-port", str(port), "--http-port", "0"],
                      ["--grpc-port", "18123", "--http-port", "18123"]):
            proc = run_cli("serve", "--repository", str(repository), *flags, timeout=60)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert str(port) in lines[0] or "18123" in lines[0]
            assert "loaded" not in proc.stderr and "warmed up" not in proc.stderr


@pytest.mark.subprocess
def test_empty_repository_warns_and_strict_refuses(repository, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("serve", "--repository", str(repository / "digits"), "--strict", "--http-port", "0",
                   "--grpc-port", "0", timeout=60)
    assert proc.returncode == 2 and "model folder, not a repository" in proc.stderr, proc.stderr
    proc = run_cli("serve", "--repository", str(empty), "--strict", "--http-port", "0", "--grpc-port", "0", timeout=60)
    assert proc.returncode == 2 and "holds no model" in proc.stderr and "config.pbtxt" in proc.stderr


@pytest.mark.subprocess
def test_verify_server_checks_the_version_in_the_entry_path(repository, tmp_path):
    """Version 2 (a perturbed copy, served as latest) must not be compared against entry REPO/M/1."""
    import onnx
    from onnx import numpy_helper

    from tests.server.conftest import ServerProcess

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
    m = onnx.load(str(repo / "digits" / "2" / "model.onnx"))
    t = m.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3.0, t.name))
    onnx.save(m, str(repo / "digits" / "2" / "model.onnx"))
    (repo / "digits" / "config.pbtxt").write_text((repo / "digits" / "config.pbtxt").read_text().replace(
        "num_versions: 1", "num_versions: 2"))
    with ServerProcess(repo, "--allow-unverified") as srv:  # version 2's bytes are not the verified ones: serve them anyway
        ok = run_cli("verify", "--server", srv.grpc, str(repo / "digits" / "1"), "--batch-sizes", "1,4")
        assert ok.returncode == 0 and "version 1" in ok.stdout, ok.stdout + ok.stderr
        bad = run_cli("verify", "--server", f"http://{srv.http}", str(repo / "digits" / "2"), "--batch-sizes", "1,4")
        assert bad.returncode == 1 and "FAILED" in bad.stdout
        # an entry of another model: one line, not a shape-mismatch traceback
        other = tmp_path / "other" / "digits" / "1"
        other.parent.mkdir(parents=True)
        shutil.copytree(repository / "digits" / "1", other)
        src = other / "source.pt"
        import torch

        ckpt = torch.load(src, weights_only=True)
        ckpt["arch_args"]["num_classes"] = 5
        from trainer.checkpoint import model_from_checkpoint, save_checkpoint
        from trainer.models import build_model

        ckpt["model_state"] = build_model(ckpt["arch"], ckpt["arch_args"]).state_dict()
        save_checkpoint(src, ckpt)
        model_from_checkpoint(ckpt)
        proc = run_cli("verify", "--server", srv.grpc, str(other), "--batch-sizes", "1")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "differ in their outputs" in proc.stderr


@pytest.mark.subprocess
def test_infer_takes_the_pixel_range_and_task_from_the_served_record(repository, tmp_path):
    from PIL import Image

    from tests.server.conftest import ServerProcess

    with ServerProcess(repository) as server:
        _infer_checks(server, tmp_path, Image)


def _infer_checks(server, tmp_path, Image) -> None:
    x = (np.random.default_rng(3).random((1, 1, 8, 8)) * 16).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    Image.fromarray(np.round(x[0, 0] * 255 / 16).astype(np.uint8)).save(tmp_path / "d.png")
    Image.fromarray(np.round(x[0, 0] * 255 / 16).astype(np.uint8)).resize((32, 40)).convert("RGB").save(tmp_path / "big.png")
    want = run_cli("infer", "--url", server.grpc, "--model", "digits", str(tmp_path / "x.npy"), "--top", "1")
    got = run_cli("infer", "--url", server.grpc, "--model", "digits", str(tmp_path / "d.png"), "--top", "1")
    assert want.returncode == got.returncode == 0, got.stderr
    top = next(ln for ln in want.stdout.splitlines() if "class" in ln).split("probability")[0]
    assert top in got.stdout, (want.stdout, got.stdout)   # same class without --scale: 0..255 -> 0..16
    big = run_cli("infer", "--url", server.grpc, "--model", "digits", str(tmp_path / "big.png"))
    assert big.returncode == 0 and "converted to the model's 8x8 L" in big.stderr
    out = run_cli("infer", "--url", f"http://{server.http}", "--model", "digits", str(tmp_path / "x.npy"),
                  "--out", str(tmp_path / "y.npy"))
    assert out.returncode == 0 and np.load(tmp_path / "y.npy").shape == (1, 10)
    z = tmp_path / "z.npz"
    np.savez(z, a=x, b=x)
    missing = run_cli("infer", "--url", server.grpc, "--model", "digits", str(z), "--key", "nope")
    assert missing.returncode == 2 and "no array 'nope'" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.subprocess
def test_an_unreachable_server_is_exit_2_on_both_transports(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    s, port = _taken_port()
    s.close()
    for url in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        proc = run_cli("infer", "--url", url, "--model", "m", str(tmp_path / "x.npy"), timeout=60)
        assert proc.returncode == 2 and "cannot reach" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_interrupted_first_fold_leaves_no_empty_model_folder(digits_run, tmp_path, monkeypatch):
    from folding import export

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "_write_version", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.build_entry(export.FoldRequest(digits_run / "checkpoint.pt", tmp_path / "repo", "m", 1))
    assert not (tmp_path / "repo" / "m").exists()


def test_wrong_admin_token_is_told_it_is_wrong_not_missing():
    from foldserve.errors import Unauthenticated
    from server.core.auth import check_bearer

    with pytest.raises(Unauthenticated, match="not valid"):
        check_bearer(["Bearer nope"], "secret", "the repository API")
    with pytest.raises(Unauthenticated, match="needs an 'authorization"):
        check_bearer([], "secret", "the repository API")
    with pytest.raises(Unauthenticated, match="2 authorization headers"):
        check_bearer(["Bearer secret", "Bearer nope"], "secret", "the repository API")


def test_fold_onnx_keeps_the_external_data_layout(repository, tmp_path, capsys):
    import onnx

    src_dir = tmp_path / "src"
    src_dir.mkdir()
    m = onnx.load(str(repository / "digits" / "1" / "reference.onnx"))
    onnx.save(m, str(src_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=256)
    out = tmp_path / "out" / "folded.onnx"
    assert cli_main(["fold", "--onnx", str(src_dir / "model.onnx"), "--out", str(out)]) == 0
    assert (out.parent / "folded.onnx.data").stat().st_size > 10_000
    assert out.stat().st_size < (out.parent / "folded.onnx.data").stat().st_size
    folded = onnx.load(str(out))  # loads with its data file
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0
    onnx.checker.check_model(str(out))


def test_a_full_disk_during_fold_is_one_line_and_leaves_the_repository_untouched(digits_run, repository, tmp_path,
                                                                                  monkeypatch, capsys):
    import errno

    import onnx

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(onnx, "save", full)
    err = _one_line_error(capsys, "fold", str(digits_run / "checkpoint.pt"), "--repository", str(repo), "--name",
                          "digits", code=1)
    assert "disk is full" in err and "unchanged" in err
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before


# --- what a new user hits on the way (each one line and the right exit code) ------------------------------

def _one_line(proc, code: int, *words: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1000:], err[-2000:])
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_verify_of_a_model_folder_names_its_version(repository):
    _one_line(run_cli("verify", str(repository / "digits")), 2, "a model folder", str(repository / "digits" / "1"))


def test_fold_of_a_directory_says_it_is_a_directory(tmp_path):
    _one_line(run_cli("fold", str(tmp_path), "--repository", str(tmp_path / "repo")), 2, "a directory")


def test_infer_aimed_at_the_http_port_without_http_says_so(repository, tmp_path):
    from tests.server.conftest import ServerProcess, digits_batch

    np.save(tmp_path / "x.npy", digits_batch(1))
    with ServerProcess(repository) as srv:
        _one_line(run_cli("infer", "--url", srv.http, "--model", "digits", str(tmp_path / "x.npy"), timeout=60), 2,
                  "is an HTTP port", f"http://{srv.http}")


def test_torchscript_with_a_wrong_input_shape_says_the_shape_is_wrong(tmp_path):
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    torch.jit.save(torch.jit.script(m), str(tmp_path / "net.pt"))
    _one_line(run_cli("fold", str(tmp_path / "net.pt"), "--repository", str(tmp_path / "repo"), "--input-shape",
                      "1,16,16"), 2, "does not run on input of shape [2, 1, 16, 16]", "--input-shape 1,16,16",
              "expected input[2, 1, 16, 16] to have 3 channels")


def test_an_onnx_file_without_batchnorm_gets_a_warning_saying_why(tmp_path):
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    torch.onnx.export(m, (torch.randn(2, 3, 8, 8),), str(tmp_path / "fused.onnx"), dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    proc = run_cli("fold", str(tmp_path / "fused.onnx"), "--repository", str(tmp_path / "repo"), "--batch-sizes", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no BatchNormalization node" in proc.stdout and "dynamo=False, do_constant_folding=False" in proc.stdout


def test_a_training_mode_pt2_is_refused_before_any_work(tmp_path):
    """It used to fold, then fail verification with max_rel 3.6 and no diagnosis."""
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).train()
    torch.export.save(torch.export.export(m, (torch.randn(2, 3, 8, 8),)), str(tmp_path / "train.pt2"))
    _one_line(run_cli("fold", str(tmp_path / "train.pt2"), "--repository", str(tmp_path / "repo")), 2,
              "exported in training mode", "model.eval()")
    assert not (tmp_path / "repo" / "train").exists()


def test_a_pt2_with_a_biasless_conv3d_folds_and_verifies(tmp_path):
    """torch's dynamo exporter writes Conv3d(bias=False)'s bias as Expand(0, [C, 2]): a [C, 2] tensor that
    onnxruntime refuses. It used to crash with a traceback at verification."""
    import onnx
    import torch

    m = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, bias=False), torch.nn.BatchNorm3d(4)).eval()
    bn = m[1]
    bn.running_mean.normal_(0, 0.2)
    bn.running_var.uniform_(0.5, 2)
    torch.export.save(torch.export.export(m, (torch.randn(2, 2, 6, 6, 6),)), str(tmp_path / "c3.pt2"))
    proc = run_cli("fold", str(tmp_path / "c3.pt2"), "--repository", str(tmp_path / "repo"), "--batch-sizes", "2")
    assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stdout[-1500:] + proc.stderr[-1500:]
    served = onnx.load(str(tmp_path / "repo" / "c3" / "1" / "model.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in served.graph.node)


@pytest.mark.subprocess
def test_serve_with_cuda_and_no_gpu_is_one_line_and_exit_2(repository):
    """It logged four ERROR lines per model and kept running with no models."""
    from server.core.runtime import cuda_problem

    if cuda_problem() is None:
        pytest.skip("a CUDA device is visible here")
    proc = run_cli("serve", "--repository", str(repository), "--provider", "cuda", "--http-port", "0",
                   "--grpc-port", "0", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--provider cuda" in lines[0] and "--provider auto" in lines[0] and "loaded" not in proc.stderr


@pytest.mark.subprocess
def test_fp16_on_a_machine_without_a_gpu_says_what_the_cpu_will_do(digits_run, tmp_path):
    from server.core.runtime import gpu_count

    if gpu_count():
        pytest.skip("a CUDA device is visible here")
    proc = run_cli("fold", str(digits_run / "checkpoint.pt"), "--repository", str(tmp_path / "repo"), "--name", "h",
                   "--precision", "fp16", "--batch-sizes", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: fp16 is for GPUs")]
    assert len(notes) == 1 and "run on the CPU" in notes[0]
