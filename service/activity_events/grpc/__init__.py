"""The gRPC side: the call pipeline, admission control, the two services, auth, TLS and health."""
