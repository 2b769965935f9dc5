"""The layering of ARCHITECTURE.md, checked on the code itself: every import of every module (module level and
inside functions) points down or sideways as allowed, no import circle, the server never imports torch (and
really serves without it), and no long functions in server/ or folding/ without a stated reason."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: package -> the project packages it may import (besides itself); the order is the layering, ground first
ALLOWED: dict[str, set[str]] = {
    "foldserve": set(),
    "trainer": {"foldserve"},
    "server": {"foldserve"},
    "folding": {"foldserve", "trainer", "server"},
    "bench": {"foldserve", "trainer", "server", "folding"},
    "cli": {"foldserve", "trainer", "server", "folding", "bench"},
}
#: third-party modules a package must never import
FORBIDDEN: dict[str, set[str]] = {
    "foldserve": {"torch", "onnxruntime", "onnx", "fastapi", "uvicorn", "sklearn"},
    "server": {"torch", "sklearn", "matplotlib"},
    "trainer": {"onnxruntime", "fastapi", "uvicorn", "grpc"},
}
MAX_FUNCTION_LINES = 60
LONG_OK = "# long function:"   # a comment on the def line's previous line states why


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ALLOWED:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            if any(p.startswith(".") for p in parts):
                continue    # caches the tools make (bench/.cache/mlserver-venv) are not our code
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def _imports(path: Path, module: str) -> list[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    names = []
    pkg_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg_parts[:len(pkg_parts) - node.level + 1] + ([base] if base else []))
            names.append(base)
    return names


def _project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import name refers to (the longest known prefix), or None for third-party."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def test_every_import_points_down_the_layers():
    modules = _modules()
    assert len(modules) > 40, "the walk found the project's modules"
    wrong, forbidden = [], []
    for module, path in modules.items():
        pkg = module.split(".")[0]
        for name in _imports(path, module):
            target = _project_target(name, modules)
            if target is None:
                if name.split(".")[0] in FORBIDDEN.get(pkg, set()):
                    forbidden.append(f"{module} imports {name}")
                continue
            if target.split(".")[0] not in ALLOWED[pkg] | {pkg}:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports pointing up the layers:\n" + "\n".join(wrong)
    assert not forbidden, "forbidden third-party imports:\n" + "\n".join(forbidden)


def test_no_import_circle():
    modules = _modules()
    graph = {m: {t for n in _imports(p, m) if (t := _project_target(n, modules)) and t != m}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checks_above_can_fail(tmp_path):
    """The walker sees function-level imports and relative imports (what the checks rely on)."""
    f = tmp_path / "mod.py"
    f.write_text("def g():\n    from folding.export import build_entry\n    from .sibling import x\n")
    assert _imports(f, "server.core.mod") == ["folding.export", "server.core.sibling"]


def test_no_long_functions_in_server_and_folding():
    long = []
    for pkg in ("server", "folding"):
        for f in (ROOT / pkg).rglob("*.py"):
            if f.name.endswith("_pb2.py"):
                continue
            lines = f.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                    if n > MAX_FUNCTION_LINES and LONG_OK not in lines[first - 2]:
                        long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines without a reason:\n" + "\n".join(long)


@pytest.mark.subprocess
def test_the_server_serves_with_torch_unimportable(repository, tmp_path):
    """`foldserve serve` in a process where `import torch` fails: the serve path never needs torch."""
    from tests.server.conftest import free_port

    http = free_port()
    code = ("import sys; sys.modules['torch'] = None; sys.modules['trainer'] = None; sys.modules['folding'] = None\n"
            "from cli.main import main\n"
            f"sys.exit(main(['serve', '--repository', {str(repository)!r}, '--http-port', '{http}', "
            f"'--grpc-port', '{free_port()}']))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, status = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/digits/ready", timeout=2) as r:
                    status = r.status
                break
            except OSError:
                time.sleep(0.2)
        assert status == 200, proc.stderr.read() if proc.poll() is not None else "server did not answer"
    finally:
        proc.terminate()
        proc.wait(30)


def _extra(extras: dict[str, list[str]], name: str) -> set[str]:
    """The distribution names an extra pulls in, self-references (foldserve[x]) followed."""
    import re

    out: set[str] = set()
    for req in extras[name]:
        dist = re.split(r"[\s\[<>=;!~]", req, maxsplit=1)[0].lower()
        if dist == "foldserve":
            for sub in re.search(r"\[(.*?)\]", req).group(1).split(","):
                out |= _extra(extras, sub.strip())
        else:
            out.add(dist)
    return out


def test_the_serve_extras_install_no_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    base = {d.split(">")[0].split("<")[0].split("=")[0].lower() for d in project["dependencies"]}
    assert not base & {"torch", "onnxruntime", "fastapi"}, base
    for name in ("serve", "serve-cpu"):
        deps = _extra(extras, name)
        assert "fastapi" in deps and ({"onnxruntime", "onnxruntime-gpu"} & deps), deps
        assert not deps & {"torch", "scikit-learn", "matplotlib", "onnxscript"}, (name, deps)
    assert "onnxruntime-gpu" not in _extra(extras, "serve-cpu")
    assert "torch" in _extra(extras, "train")


@pytest.mark.subprocess
def test_commands_that_need_torch_say_so_in_one_line_where_torch_is_missing():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cli.main import main\n"
            "sys.exit(main(['train', '--epochs', '1', '--arch', 'resnet']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("foldserve train: error: not installed here: it needs torch "
                                   "(pip install 'foldserve[train]')")
    help_text = subprocess.run([sys.executable, "-c", code.replace("['train', '--epochs', '1', '--arch', 'resnet']",
                                                                   "['--help']")],
                               cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "not installed here: train, fold, verify, pipeline, bench" in " ".join(help_text.split())


def test_the_onnx_fold_is_one_pipeline_of_passes_that_inherit_no_other():
    """Every pass in ``PASSES`` implements the ``Pass`` protocol and owns a report section; the passes share the
    graph index instead of inheriting each other, and their modules need no ``type: ignore`` (no override of a
    signature they cannot keep, no branch typed by a string)."""
    import inspect

    from folding.onnx_affine import OnnxAffinePass
    from folding.onnx_branches import BranchPass
    from folding.onnx_fold import LayerFoldPass, OnnxFoldPass
    from folding.onnx_graph import GraphIndex
    from folding.onnx_passes import PASSES, Pass

    names = [p.name for p in PASSES]
    assert len(set(names)) == len(names) == len(PASSES)
    for p in PASSES:
        for method in ("count", "run"):
            assert callable(getattr(p, method, None)), (p, method)
            assert list(inspect.signature(getattr(p, method)).parameters) == \
                list(inspect.signature(getattr(Pass, method)).parameters)[1:], (p, method)
    assert OnnxFoldPass not in OnnxAffinePass.__mro__ and OnnxFoldPass not in BranchPass.__mro__
    assert LayerFoldPass in OnnxAffinePass.__mro__ and GraphIndex in BranchPass.__mro__
    for module in ("onnx_fold", "onnx_affine", "onnx_branches", "onnx_passes", "onnx_graph"):
        assert "type: ignore" not in (ROOT / "folding" / f"{module}.py").read_text(), module


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """Every string literal of a module that is not a docstring (f-string parts included), with its line."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_library_speaks_in_fields_and_the_cli_in_flags():
    """No message of folding/, trainer/ or server/core/ names a command-line flag: the library names the field
    (``FoldRequest.max_batch_size``), the CLI renders it (``cli/flags.py``), and the server's core names a setting
    through ``server.settings.flag``; every field the library names has a flag in the CLI's table."""
    import re

    from cli.flags import FLAGS, render

    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
    field = re.compile(r"\b(?:FoldRequest|Options|TrainConfig)\.[a-z_]+\b")
    found, named = [], set()
    for folder in ("folding", "trainer", "server/core"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in _message_strings(path):
                found += [f"{path.relative_to(ROOT)}:{line}: {m}" for m in flag.findall(text)]
                named |= set(field.findall(text))
    assert not found, "flags in library messages:\n" + "\n".join(found)
    assert named and named <= set(FLAGS), sorted(named - set(FLAGS))
    assert render("FoldRequest.max_batch_size must be >= 1 (Options.data x.npz)") == \
        "--max-batch-size must be >= 1 (--data x.npz)"
