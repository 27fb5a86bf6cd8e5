"""What the server tells operators: statistics, Prometheus metrics, traces and logs."""
