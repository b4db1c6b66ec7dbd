"""Generated protobuf messages and gRPC stubs of the edge–cloud protocol (``fluxshard.proto``).

Import ``fluxshard_pb2`` / ``fluxshard_pb2_grpc`` from here; regenerate both with ``python tools/gen_proto.py``.
"""
