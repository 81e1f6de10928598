"""Generates the Python client for customermapping.v1 from ../../proto.

Run it on its own (`python generate.py`) or let billing_flow.py call it: the
code goes to gen/ (gitignored), regenerated on every run so it always matches
the contract. Only grpcio-tools is needed, no system protoc.

google/protobuf/timestamp.proto comes with grpcio-tools; the google.rpc error
detail types come prebuilt from googleapis-common-protos (google.rpc.*_pb2),
so ../../proto/google is not compiled here.
"""

import os
import sys

import grpc_tools
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
OUT = os.path.join(HERE, "gen")
CONTRACT = "customermapping/v1/customer_mapping.proto"


def generate() -> str:
    """Writes gen/customermapping/v1/customer_mapping_pb2{,_grpc}.py; returns gen/."""
    os.makedirs(OUT, exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            os.path.join(PROTO_ROOT, CONTRACT),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed ({code}) on {CONTRACT}")
    return OUT


if __name__ == "__main__":
    print(f"generated into {generate()}", file=sys.stderr)
