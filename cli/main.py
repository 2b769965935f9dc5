"""foldserve: train, fold, verify, pipeline, serve, infer, bench.

The command table maps each command to its module; a module declares what it needs (``REQUIRES``) and
imports its stage only when it runs, so ``foldserve serve`` never imports torch and an install without
the ``train`` extra lists train/fold/verify as not installed instead of failing on them. User errors
(:class:`foldserve.errors.UserError`) print one line and exit 2; verification failures exit 1.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from cli.flags import FlagNames, render
from foldserve import __version__
from foldserve.errors import ConfigError, FoldserveError

#: command -> module (each has add_parser(subparsers), run(args) and REQUIRES)
COMMANDS: dict[str, str] = {
    "train": "cli.train", "fold": "cli.fold", "verify": "cli.verify", "pipeline": "cli.pipeline",
    "serve": "cli.serve", "infer": "cli.infer", "bench": "cli.bench",
}
EXTRA_FOR = {"torch": "train", "onnx": "train", "onnxruntime": "serve", "fastapi": "serve", "uvicorn": "serve",
             "prometheus_client": "serve", "sklearn": "train", "matplotlib": "train"}


def missing_requirements(module: ModuleType) -> list[str]:
    return [name for name in getattr(module, "REQUIRES", ()) if importlib.util.find_spec(name) is None]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, list[str]]]:
    """The parser with every installed command; also returns the commands that are not installed."""
    parser = argparse.ArgumentParser(prog="foldserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"foldserve {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    unavailable: dict[str, list[str]] = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        missing = missing_requirements(module)
        if missing:
            unavailable[name] = missing
            _add_unavailable(sub, name, missing)
            continue
        module.add_parser(sub)
    if unavailable:
        extras = sorted({EXTRA_FOR.get(m, "train") for ms in unavailable.values() for m in ms})
        parser.epilog = (f"not installed here: {', '.join(unavailable)} (pip install "
                         f"'foldserve[{','.join(extras)}]')")
    return parser, unavailable


def _add_unavailable(sub: argparse._SubParsersAction, name: str, missing: list[str]) -> None:
    """A placeholder for a command whose requirements are not installed: it says so in one line."""
    extra = EXTRA_FOR.get(missing[0], "train")
    message = f"not installed here: it needs {', '.join(missing)} (pip install 'foldserve[{extra}]')"
    p = sub.add_parser(name, help=f"({message})", add_help=False)

    def run(args: argparse.Namespace) -> int:
        raise ConfigError(message)
    p.set_defaults(func=run)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(FlagNames())


def main(argv: Sequence[str] | None = None) -> int:
    parser, unavailable = build_parser()
    # a command that is not installed answers with one line whatever flags follow it
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in unavailable:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(argv) if argv is not None else sys.argv[1:]     # which flags were given (train --resume)
    _configure_logging(getattr(args, "log_level", "INFO"))
    try:
        return int(args.func(args) or 0)
    except FoldserveError as exc:
        print(f"foldserve {args.command}: error: {render(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"foldserve {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head -1`): stop at once, as a Unix tool does. Everything still buffered for the
        # closed pipe goes to /dev/null, so neither the exit's flush nor an error message can raise again, and
        # os._exit skips the interpreter's teardown, where a gRPC channel still open waited forever
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, stream.fileno())
        os._exit(141)       # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
