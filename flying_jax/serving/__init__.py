"""Serving over gRPC: the contracts in `serve/proto/` and their generated stubs in `proto/`."""
