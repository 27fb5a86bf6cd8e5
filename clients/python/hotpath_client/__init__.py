"""hotpath-client: call hotpath (or any Open Inference Protocol gRPC server) with numpy arrays.

`Client` blocks, `AsyncClient` is its asyncio twin; both raise only `HotpathError`, which carries
the gRPC status code. The package depends on grpcio, protobuf and numpy, never on the server.
"""

from hotpath_client._client import AsyncClient, Client
from hotpath_client._errors import HotpathError
from hotpath_client._tensors import StreamResult

__all__ = ["AsyncClient", "Client", "HotpathError", "StreamResult"]
__version__ = "0.1.0"
