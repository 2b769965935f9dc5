"""Subcommands of the later stages (fold, verify, serve, infer, pipeline), registered on the CLI."""
from __future__ import annotations

import argparse
from typing import Callable

REGISTER: list[Callable[[argparse._SubParsersAction], None]] = []
