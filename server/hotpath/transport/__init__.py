"""The front end: the native gRPC server, the routing of its calls and the services that answer them."""
