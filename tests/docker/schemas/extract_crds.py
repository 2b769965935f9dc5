"""Refresh kserve-crds.json.gz from a KServe checkout: ``python extract_crds.py PATH/TO/kserve``."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

FILES = ("servingruntimes", "clusterservingruntimes", "inferenceservices")


def main(kserve: Path) -> None:
    out = {}
    for name in FILES:
        crd = yaml.safe_load((kserve / "config" / "crd" / "full" / f"serving.kserve.io_{name}.yaml").read_text())
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                key = f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"
                out[key] = version["schema"]["openAPIV3Schema"]
    data = json.dumps(out, sort_keys=True, separators=(",", ":")).encode()
    with gzip.GzipFile(Path(__file__).with_name("kserve-crds.json.gz"), "wb", mtime=0) as f:
        f.write(data)
    print(f"{len(out)} schemas: {sorted(out)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
