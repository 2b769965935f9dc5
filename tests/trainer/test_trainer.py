from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main as cli_main
from tests.conftest import BIN, ROOT, run_cli
from trainer import bn_stats
from trainer.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from trainer.data import load_dataset
from trainer.models import ARCHITECTURES, arch_spec, build_model, count_bn, resolve_arch_args
from trainer.train import TrainConfig, iterate_batches, train


def _quick(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(arch="resnet", dataset="synthetic", out=str(tmp_path / "run"), epochs=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_reloaded_checkpoint_gives_bit_identical_eval_outputs(tmp_path):
    result = train(_quick(tmp_path))
    ckpt = load_checkpoint(result.checkpoint)
    reloaded = model_from_checkpoint(ckpt)
    x = torch.randn(16, 1, 8, 8) * 4 + 5
    with torch.no_grad():
        assert torch.equal(result.model(x), reloaded(x))
    # the artifacts next to it
    out = result.checkpoint.parent
    assert json.loads((out / "metrics.json").read_text())[-1]["epoch"] == 2
    assert (out / "metrics.csv").read_text().startswith("epoch,")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ckpt["format_version"] == 1 and ckpt["arch"] == "resnet"
    assert ckpt["normalization"]["std"][0] > 0 and len(ckpt["class_names"]) == 10


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("placement", ["before", "after"])
def test_every_architecture_builds_with_bn_and_runs(arch, placement):
    spec = arch_spec(arch)
    shape = [1, 8, 8] if spec.input_kind != "sequence" else [1, 64]
    model = build_model(arch, resolve_arch_args(arch, shape, 10, placement)).eval()
    assert count_bn(model) >= 2
    out = model(torch.randn(3, *shape))
    assert out.shape == ((3, 10) if spec.task == "classification" else (3, *shape))
    # convs/linears directly followed by BN carry no bias
    if placement == "before":
        mods = list(model.modules())
        for a, b in itertools.pairwise(mods):
            if isinstance(b, torch.nn.modules.batchnorm._BatchNorm) and hasattr(a, "bias") and not isinstance(
                    a, torch.nn.modules.batchnorm._BatchNorm):
                assert a.bias is None, f"{type(a).__name__} before BN has a bias"


def test_precise_bn_sets_population_statistics(tmp_path):
    cfg = _quick(tmp_path, arch="mlp", dataset="digits", epochs=1, precise_bn=1000, batch_size=50)
    result = train(cfg)
    ckpt = load_checkpoint(result.checkpoint)
    model = model_from_checkpoint(ckpt)

    # Independently: the inputs each BN sees in train mode (dropout off) over the training set.
    ds = load_dataset("digits", seed=cfg.seed, val_fraction=cfg.val_fraction, input_kind="any")
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [bn.register_forward_pre_hook(lambda m, inp, name=name: captured.setdefault(name, []).append(inp[0]))
             for name, bn in bn_stats.bn_layers(model)]
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    with torch.no_grad():
        for xb, _ in iterate_batches(torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train), 50, shuffle=False):
            model(xb)
    for h in hooks:
        h.remove()
    saved = ckpt["model_state"]
    assert captured
    for name, chunks in captured.items():
        x = torch.cat(chunks).double()
        mean, var = x.mean(0), x.var(0, unbiased=True)
        torch.testing.assert_close(saved[f"{name}.running_mean"].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(saved[f"{name}.running_var"].double(), var, rtol=1e-4, atol=1e-5)


def test_cumulative_bn_momentum_is_saved(tmp_path):
    result = train(_quick(tmp_path, bn_momentum=None, epochs=1))
    assert all(bn.momentum is None for _, bn in bn_stats.bn_layers(result.model))
    assert load_checkpoint(result.checkpoint)["config"]["bn_momentum"] is None


def _torchrun(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "cli.main", "train", "--arch", "resnet", "--dataset", "synthetic", "--epochs", "2",
           "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "ddp"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digests(stderr: str) -> dict[int, str]:
    out = {}
    for line in stderr.splitlines():
        if "running-statistics digest" in line:
            parts = line.split()
            out[int(parts[parts.index("rank") + 1])] = parts[-1]
    return out


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("sync_bn", [False, True])
def test_ddp_two_processes_agree_on_running_statistics(tmp_path, sync_bn):
    proc = _torchrun(tmp_path, *(["--sync-bn"] if sync_bn else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = _digests(proc.stderr)
    assert set(digests) == {0, 1}, proc.stderr[-2000:]
    assert digests[0] == digests[1]
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    model = model_from_checkpoint(ckpt)
    assert not any(isinstance(m, (torch.nn.SyncBatchNorm, bn_stats.CPUSyncBatchNorm)) for m in model.modules())
    assert count_bn(model) > 0
    assert bn_stats.stats_digest(model) == digests[0]


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_mid_training_leaves_a_loadable_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "killed"
    args = ["train", "--arch", "resnet", "--dataset", "synthetic", "--epochs", "200", "--no-progress",
            "--out", str(out)]
    proc = subprocess.Popen([str(BIN / "foldserve"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT, text=True)
    ckpt_path = out / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt_path.exists():
            # let it write a few more checkpoints so the kill lands at a random point of a write or a step
            time.sleep(1.5)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    ckpt = load_checkpoint(ckpt_path)
    done = ckpt["epoch"]
    assert 1 <= done < 200
    model_from_checkpoint(ckpt)

    resumed = run_cli("--log-level", "INFO", *args[:5], "--epochs", str(done + 2), "--no-progress",
                      "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {ckpt_path} at epoch {done}" in resumed.stderr
    final = load_checkpoint(ckpt_path)
    assert final["epoch"] == done + 2
    assert [h["epoch"] for h in final["history"]] == list(range(1, done + 3))


# --- bad input -------------------------------------------------------------------------------------

def _cli_error(capsys, *args: str) -> str:
    code = cli_main(["--log-level", "ERROR", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_unknown_architecture_and_dataset(tmp_path, capsys):
    err = _cli_error(capsys, "train", "--arch", "vgg99", "--out", str(tmp_path / "a"))
    assert "unknown architecture 'vgg99'" in err and "resnet" in err
    err = _cli_error(capsys, "train", "--dataset", "imagenet", "--out", str(tmp_path / "b"))
    assert "unknown dataset 'imagenet'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_data_files(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    err = _cli_error(capsys, "train", "--dataset", "npz", "--data", str(bad), "--out", str(tmp_path / "o1"))
    assert "not a readable .npz" in err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((10, 8, 8), np.float32), y=np.zeros(7, np.int64))
    err = _cli_error(capsys, "train", "--dataset", "npz", "--data", str(wrong), "--out", str(tmp_path / "o2"))
    assert "'y' must be a 1-D array of 10 labels" in err
    seq = tmp_path / "seq.npz"
    np.savez(seq, x=np.zeros((10, 5), np.float32), y=np.arange(10) % 2)
    err = _cli_error(capsys, "train", "--arch", "resnet", "--dataset", "npz", "--data", str(seq),
                     "--out", str(tmp_path / "o3"))
    assert "takes images" in err
    err = _cli_error(capsys, "train", "--dataset", "npz", "--out", str(tmp_path / "o4"))
    assert "needs --data" in err
    err = _cli_error(capsys, "train", "--dataset", "npz", "--data", str(tmp_path / "missing.npz"),
                     "--out", str(tmp_path / "o5"))
    assert "no such file" in err
    for i in range(1, 6):
        assert not (tmp_path / f"o{i}").exists()


def test_npz_and_image_folder_datasets_train(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            arr = (rng.random((10, 10)) * 255 * (0.3 if cls == "cat" else 1.0)).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    result = train(_quick(tmp_path, dataset="folder", data=str(root), image_size=8, epochs=1, batch_size=8))
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["class_names"] == ["cat", "dog"] and ckpt["arch_args"]["input_shape"] == [1, 8, 8]

    npz = tmp_path / "seq.npz"
    np.savez(npz, x=rng.normal(size=(60, 2, 16)).astype(np.float32), y=np.arange(60) % 3)
    result = train(_quick(tmp_path, arch="conv1d", dataset="npz", data=str(npz), epochs=1, batch_size=16,
                          out=str(tmp_path / "seq")))
    assert load_checkpoint(result.checkpoint)["arch_args"]["input_shape"] == [2, 16]


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)
    err = _cli_error(capsys, "train", "--dataset", "synthetic", "--out", str(out), "--resume")
    assert "cannot be read as a torch checkpoint" in err
    torch.save({"state_dict": {}}, out / "checkpoint.pt")
    err = _cli_error(capsys, "train", "--dataset", "synthetic", "--out", str(out), "--resume")
    assert "not a foldserve checkpoint" in err
    # a pickle that would run code is refused by weights_only loading
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling it would create ``marker``
            return (open, (str(marker), "w"))

    (out / "checkpoint.pt").write_bytes(pickle.dumps(Evil()))
    pickle.loads(pickle.dumps(Evil())).close()  # the payload works when unpickled without protection ...
    assert marker.exists()
    marker.unlink()
    err = _cli_error(capsys, "train", "--dataset", "synthetic", "--out", str(out), "--resume")
    assert "cannot be read" in err
    assert not marker.exists(), "the checkpoint loader ran the pickle's code"  # ... and weights_only refused it


def test_resume_refuses_a_different_architecture(tmp_path, capsys):
    train(_quick(tmp_path, epochs=1))
    err = _cli_error(capsys, "train", "--arch", "mlp", "--dataset", "synthetic", "--epochs", "2",
                     "--out", str(tmp_path / "run"), "--resume", "--no-progress")
    assert "holds a 'resnet' model" in err


@pytest.mark.subprocess
def test_cli_prints_checkpoint_path_and_user_errors_have_no_traceback(tmp_path):
    proc = run_cli("train", "--arch", "mlp", "--dataset", "synthetic", "--epochs", "1", "--out",
                   str(tmp_path / "cli"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint: {tmp_path / 'cli' / 'checkpoint.pt'}" in proc.stdout
    proc = run_cli("train", "--arch", "nope", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown architecture" in proc.stderr


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    from foldserve.atomic import write_with

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"arch": "resnet", "arch_args": {}, "model_state": {}, "task": "classification",
                           "normalization": {}, "class_names": [], "epoch": 1})
    before = path.read_bytes()

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_with(path, crash)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.subprocess
def test_resume_alone_continues_the_run_as_it_was_configured(tmp_path):
    """`train --out RUN --resume` rebuilt the default dataset and then refused the checkpoint (53 s later): it reads
    the run's own config.json; flags change only what a resumed run may (more epochs), and one that would change
    what was trained is one line naming it, before any work."""
    out = tmp_path / "run"
    first = run_cli("train", "--arch", "mlp", "--dataset", "synthetic", "--epochs", "1", "--out", str(out),
                    "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli("--log-level", "INFO", "train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr and load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["arch"] == "mlp"
    wrong = run_cli("train", "--out", str(out), "--resume", "--dataset", "digits", "--epochs", "3")
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 2 and len(lines) == 1, wrong.stderr
    assert "--dataset 'synthetic'" in lines[0] and "--dataset 'digits'" in lines[0] and "Traceback" not in wrong.stderr
