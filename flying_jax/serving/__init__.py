"""Serving over gRPC (the contracts in `serve/proto/`, their generated stubs in `proto/`) and
OpenAI's HTTP API beside it (`openai_api`), both on one engine loop (`server`)."""
