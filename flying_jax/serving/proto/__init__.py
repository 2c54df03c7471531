"""Python stubs generated from `serve/proto/*.proto` by `make protos` (do not edit by hand)."""
