"""The generated code in protos/latentd/v1 is what `make protos` makes from the .proto today."""

from __future__ import annotations

from pathlib import Path

PROTOS = Path(__file__).resolve().parents[1] / "protos"
GENERATED = ("latentd_pb2.py", "latentd_pb2.pyi", "latentd_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path):
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTOS}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(PROTOS / "latentd" / "v1" / "latentd.proto")]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "latentd" / "v1" / name).read_text()
        assert (PROTOS / "latentd" / "v1" / name).read_text() == fresh, f"{name} is stale: run `make protos`"


def test_the_installed_package_serves_the_contract():
    from latentd.v1 import latentd_pb2, latentd_pb2_grpc

    service = latentd_pb2.DESCRIPTOR.services_by_name["Latentd"]
    expected = {"Encode", "Decode", "EncodeStream", "DecodeStream", "ListModels", "GetModel"}
    assert expected <= set(service.methods_by_name)
    assert hasattr(latentd_pb2_grpc, "LatentdServicer")
