"""The wire formats, one module each, free of HTTP and gRPC: each turns its
requests into a ``service.compute.LossCall`` and an ``Evaluation`` back into
its responses.

- ``v1``: the service's own JSON (contract sections 3-5)
- ``oip``: the Open Inference Protocol's model: datatypes, parameters,
  outputs and metadata, shared by both of its transports
- ``oip_json``: OIP over REST, JSON and the binary tensor data extension
- ``oip_grpc``: OIP over gRPC, protobuf messages
"""
