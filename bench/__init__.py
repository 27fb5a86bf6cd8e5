"""hotpath's benchmark harness: models, a naive reference server, the ORT ceiling and the load generator."""
