"""The data plane and its models: requests decoded, cached, batched and run on ONNX Runtime."""
