"""One worker of ``foldserve serve --workers N`` (started by :mod:`server.supervisor`, never by hand):
reads its settings from standard input (the supervisor writes them there: tokens never touch a file) and serves
on the shared ports as one member of the cluster."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from server.core.coordinator import ClusterCoordinator
from server.core.runfolder import RUN_DIR_ENV, WORKER_ENV
from server.settings import Settings


def main() -> int:
    root, index = Path(os.environ[RUN_DIR_ENV]), int(os.environ[WORKER_ENV])
    settings = Settings(**json.loads(sys.stdin.read()))
    sys.stdin.close()
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker {index} %(name)s: %(message)s")
    from server.main import run

    return run(settings, ClusterCoordinator(root, index, settings.worker_count(), handoff=settings.handoff))


if __name__ == "__main__":
    sys.exit(main())
