"""``foldserve verify``: check an entry against its unfolded model, locally or as a running server serves it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.common import add_verify_flags, verify_options
from foldserve.errors import ConfigError

REQUIRES = ("torch", "onnx", "onnxruntime")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a folded repository entry against the unfolded model")
    p.add_argument("entry", nargs="?", help="REPO/NAME/VERSION written by `foldserve fold`")
    p.add_argument("--url", dest="server", help="HOST:PORT (gRPC) or http://HOST:PORT of a running server: verify "
                                                 "what it serves (as `foldserve infer --url`)")
    p.add_argument("--server", dest="server", help=argparse.SUPPRESS)          # the spelling of earlier releases
    p.add_argument("--model", help="with --url: model name (default: the entry's NAME)")
    p.add_argument("--version", help="with --url: version to check (default: the entry's VERSION)")
    p.add_argument("--auth-token", dest="token", help="with --url: bearer token, if the server requires one (the "
                                                       "server's --auth-token)")
    p.add_argument("--token", dest="token", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    add_verify_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.entry:
        raise ConfigError("verify needs REPO/NAME/VERSION (with --url HOST:PORT: the local entry to compare "
                          "the served model against)")
    from foldserve.entry import split_entry_path, version_numbers
    from foldserve.names import is_version_folder

    entry = Path(args.entry)
    if not is_version_folder(entry.name) and version_numbers(entry):
        split_entry_path(entry)                # a model folder: the error names a version to verify
    if args.server:
        from folding.live import verify_live

        report = verify_live(args.server, Path(args.entry), verify_options(args), model=args.model,
                             version=args.version, token=args.token)
        print(json.dumps(report, indent=2) if args.json else report["table"])
        return 0 if report["passed"] else 1
    from folding.verify import summary_table, verify_entry

    result = verify_entry(args.entry, verify_options(args))
    print(json.dumps(result.to_json(), indent=2) if args.json else summary_table(result))
    return 0 if result.passed else 1
