"""The committed gRPC stubs are exactly what proto/generate.py makes from proto/ (no drift)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_generated_stubs_match_the_proto_files(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*") if p.is_file())
    assert generated, "nothing was generated"
    for rel in generated:
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is generated but not committed"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} differs from the proto: run `python proto/generate.py` and commit the result")


def test_stubs_and_tritonclient_agree_on_the_wire_format():
    """Field numbers of the messages tritonclient decodes match Triton's (read from tritonclient's own
    descriptors in a separate process, since both define proto package 'inference')."""
    code = r'''
import json, sys
mod = sys.argv[1]
if mod == "ours":
    from foldserve.protocol import grpc_service_pb2 as sp, model_config_pb2 as mc
else:
    from tritonclient.grpc import service_pb2 as sp, model_config_pb2 as mc
out = {}
for m, names in ((sp, ["ModelInferRequest", "ModelInferResponse", "ModelMetadataResponse", "ModelStatistics",
                       "InferStatistics", "RepositoryIndexResponse", "ServerMetadataResponse", "LogSettingsRequest",
                       "LogSettingsResponse", "TraceSettingRequest", "TraceSettingResponse"]),
                 (mc, ["ModelConfig", "ModelInput", "ModelOutput", "ModelDynamicBatching"])):
    for n in names:
        d = m.DESCRIPTOR.message_types_by_name[n]
        out[n] = {f.name: [f.number, f.type] for f in d.fields}
print(json.dumps(out))
'''
    import json

    ours = json.loads(subprocess.run([sys.executable, "-c", code, "ours"], capture_output=True, text=True,
                                     cwd=ROOT, check=True).stdout)
    theirs = json.loads(subprocess.run([sys.executable, "-c", code, "triton"], capture_output=True, text=True,
                                       cwd=ROOT, check=True).stdout)
    for msg, fields in ours.items():
        for name, (number, ftype) in fields.items():
            assert theirs[msg].get(name) == [number, ftype], f"{msg}.{name}: ours {number}/{ftype}, " \
                                                             f"Triton's {theirs[msg].get(name)}"
