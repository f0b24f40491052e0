"""The committed generated protobuf code must match what `make proto` produces from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "protos" / "openlora" / "v1").glob("*.proto"))


def test_committed_generated_code_matches_protos(tmp_path: Path) -> None:
    assert PROTOS, "no .proto files found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *[str(p.relative_to(ROOT / "protos")) for p in PROTOS],
        ],
        check=True,
        cwd=ROOT / "protos",
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc produced nothing"
    stale = [str(rel) for rel in generated if (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_every_service_the_design_names_is_generated() -> None:
    from openlora.v1 import admin_pb2, inference_pb2, worker_pb2

    assert "Generate" in inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].methods_by_name
    admin_rpcs = set(admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name)
    assert {
        "CreateTenant",
        "CreateApiKey",
        "RevokeApiKey",
        "UploadAdapter",
        "GetAdapter",
        "ListAdapters",
        "DeleteAdapter",
        "GetUsage",
        "GetInvoice",
        "ListWorkers",
    } <= admin_rpcs
    worker_rpcs = set(worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].methods_by_name)
    assert {"RegisterWorker", "Heartbeat", "Authorize", "FetchArtifact", "ReportUsage"} <= worker_rpcs
