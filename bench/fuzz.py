"""Fuzz a running hotpath server: hypothesis-generated ModelInferRequests and raw bytes, over real gRPC.

A reply is a failure when its status is INTERNAL or UNKNOWN (the server blamed itself for a request),
when it takes longer than HANG_S (a hang), or when the server stops answering (a crash). The suite
runs a short fuzz (tests/test_fuzz.py); a long one runs from here:

    python -m bench.fuzz --model-repository REPO --examples 20000

against a server it starts over REPO (or `--target host:port` for one already running).
"""

from __future__ import annotations

import argparse
import collections
import math
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.server_process import ServerProcess
from hotpath._proto import grpc_service_pb2 as pb
from hotpath.serving.datatypes import DATATYPES

SERVICE = "/inference.GRPCInferenceService/"
HANG_S = 2.0
"""Longest any fuzzed call may take before it counts as a hang."""
BLAMED_ITSELF = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
INT64 = st.integers(-(2**63), 2**63 - 1)
CONTENT_FIELDS = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1), "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1), "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32), "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=32),
}
RAW_METHODS = ("ModelInfer", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics", "RepositoryIndex",
               "RepositoryModelLoad", "RepositoryModelUnload", "ServerMetadata")


class FuzzFailure(AssertionError):
    """A fuzzed request made the server blame itself, hang or die."""


def _names(known: Iterable[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(sorted(known)), st.text(max_size=16), st.text(string.ascii_letters, min_size=200, max_size=400))


def _shapes() -> st.SearchStrategy[list[int]]:
    small = st.lists(st.integers(-2, 8), max_size=4)
    return st.one_of(small, st.lists(st.one_of(st.integers(-2, 8), INT64), max_size=6))


def _contents() -> st.SearchStrategy[pb.InferTensorContents]:
    return st.sets(st.sampled_from(sorted(CONTENT_FIELDS)), max_size=2).flatmap(
        lambda fields: st.fixed_dictionaries({f: st.lists(CONTENT_FIELDS[f], max_size=40) for f in fields})
    ).map(lambda values: pb.InferTensorContents(**values))


def _parameters() -> st.SearchStrategy[dict[str, pb.InferParameter]]:
    value = st.one_of(st.builds(pb.InferParameter, bool_param=st.booleans()),
                      st.builds(pb.InferParameter, int64_param=INT64),
                      st.builds(pb.InferParameter, string_param=st.text(max_size=16)))
    return st.dictionaries(st.sampled_from(["priority", "timeout", "binary_data_output", "x"]), value, max_size=2)


def requests(models: dict[str, pb.ModelMetadataResponse]) -> st.SearchStrategy[pb.ModelInferRequest]:
    """ModelInferRequests aimed at `models` and at names nobody serves, anything in any field."""
    inputs = {t.name for m in models.values() for t in m.inputs}
    outputs = {t.name for m in models.values() for t in m.outputs}
    tensor = st.builds(
        pb.ModelInferRequest.InferInputTensor, name=_names(inputs), datatype=_names(DATATYPES), shape=_shapes(),
        parameters=_parameters(), contents=st.one_of(st.none(), _contents()))
    requested = st.builds(pb.ModelInferRequest.InferRequestedOutputTensor, name=_names(outputs))
    return st.builds(
        pb.ModelInferRequest, model_name=_names(models), model_version=st.sampled_from(["", "1", "2", "-1", "x"]),
        id=st.text(max_size=8), parameters=_parameters(), inputs=st.lists(tensor, max_size=3),
        outputs=st.lists(requested, max_size=2), raw_input_contents=st.one_of(st.just([]), st.lists(st.binary(max_size=64), max_size=3)))


def _bytes_elements(count: int) -> st.SearchStrategy[bytes]:
    element = st.one_of(st.binary(max_size=12), st.floats().map(lambda f: str(f).encode()), st.integers().map(lambda i: str(i).encode()))
    return st.lists(element, min_size=count, max_size=count).map(
        lambda items: b"".join(len(item).to_bytes(4, "little") + item for item in items))


def _exact_raw(tensor: pb.ModelMetadataResponse.TensorMetadata, shape: list[int]) -> st.SearchStrategy[bytes]:
    count = math.prod(shape)
    if tensor.datatype == "BYTES":
        return _bytes_elements(count)
    size = count * DATATYPES[tensor.datatype].itemsize
    return st.binary(min_size=size, max_size=size)


def near_valid(models: dict[str, pb.ModelMetadataResponse]) -> st.SearchStrategy[pb.ModelInferRequest]:
    """Requests that are right for a served model, or right but for one field: they reach batching and ONNX Runtime."""

    def for_model(name: str, rows: int, spoil: int) -> st.SearchStrategy[pb.ModelInferRequest]:
        metadata = models[name]
        shapes = [[rows if d < 0 else d for d in t.shape] for t in metadata.inputs]
        tensors = [pb.ModelInferRequest.InferInputTensor(name=t.name, datatype=t.datatype, shape=shape)
                   for t, shape in zip(metadata.inputs, shapes)]
        raw = st.tuples(*(_exact_raw(t, shape) for t, shape in zip(metadata.inputs, shapes))).map(list)
        request = st.builds(lambda contents: pb.ModelInferRequest(model_name=name, inputs=tensors, raw_input_contents=contents), raw)
        if spoil >= len(tensors):
            return request
        return st.tuples(request, _shapes(), st.binary(max_size=64), st.sampled_from(["shape", "raw", "drop"])).map(
            lambda args: _spoiled(*args, index=spoil))

    return st.tuples(st.sampled_from(sorted(models)), st.integers(1, 4), st.integers(0, 8)).flatmap(lambda t: for_model(*t))


def _spoiled(request: pb.ModelInferRequest, shape: list[int], raw: bytes, how: str, index: int) -> pb.ModelInferRequest:
    if how == "shape":
        request.inputs[index].ClearField("shape")
        request.inputs[index].shape.extend(shape)
    elif how == "raw":
        request.raw_input_contents[index] = raw
    else:
        del request.inputs[index]
        del request.raw_input_contents[index]
    return request


def served_models(target: str) -> dict[str, pb.ModelMetadataResponse]:
    """Every ready model's metadata."""
    with grpc.insecure_channel(target) as channel:
        index = channel.unary_unary(SERVICE + "RepositoryIndex", pb.RepositoryIndexRequest.SerializeToString,
                                    pb.RepositoryIndexResponse.FromString)(pb.RepositoryIndexRequest(ready=True), timeout=10)
        metadata = channel.unary_unary(SERVICE + "ModelMetadata", pb.ModelMetadataRequest.SerializeToString,
                                       pb.ModelMetadataResponse.FromString)
        return {model.name: metadata(pb.ModelMetadataRequest(name=model.name), timeout=10) for model in index.models}


class Fuzzer:
    """Sends fuzzed calls to one server over one channel and counts the statuses it answers with."""

    def __init__(self, target: str, alive: Callable[[], bool] = lambda: True) -> None:
        self.target = target
        self.alive = alive
        self.statuses: collections.Counter[str] = collections.Counter()
        self.slowest_s = 0.0
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self._calls = {method: self._channel.unary_unary(SERVICE + method) for method in RAW_METHODS}

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, body: bytes) -> grpc.StatusCode:
        """One call with `body` as its message; raises FuzzFailure on a status the server must not give."""
        start = time.perf_counter()
        try:
            self._calls[method](body, timeout=HANG_S)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        elapsed = time.perf_counter() - start
        self.slowest_s = max(self.slowest_s, elapsed)
        self.statuses[code.name] += 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise FuzzFailure(f"{method} hung: no answer within {HANG_S} s to {body[:200]!r}")
        if code == grpc.StatusCode.UNAVAILABLE and not self.alive():
            raise FuzzFailure(f"the server died on {method} {body[:200]!r}")
        if code in BLAMED_ITSELF:
            raise FuzzFailure(f"{method} answered {code.name} ({details}) to {body[:200]!r}")
        return code

    def run(self, examples: int, models: dict[str, pb.ModelMetadataResponse]) -> None:
        """Fuzz ModelInfer with `examples` requests of each kind, then every method with `examples` raw bodies."""
        options = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                           suppress_health_check=list(HealthCheck))

        @options
        @given(request=requests(models))
        def structured(request: pb.ModelInferRequest) -> None:
            self.call("ModelInfer", request.SerializeToString())

        @options
        @given(request=near_valid(models))
        def nearly_right(request: pb.ModelInferRequest) -> None:
            self.call("ModelInfer", request.SerializeToString())

        @options
        @given(method=st.sampled_from(RAW_METHODS), body=st.binary(max_size=256))
        def raw(method: str, body: bytes) -> None:
            self.call(method, body)

        structured()
        nearly_right()
        raw()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model-repository", type=Path, help="start a server over this repository")
    where.add_argument("--target", help="fuzz a server already listening at host:port")
    parser.add_argument("--examples", type=int, default=20_000, help="examples per strategy (default 20000)")
    args = parser.parse_args()
    server = None
    if args.model_repository:
        log = Path(tempfile.mkdtemp(prefix="hotpath-fuzz-")) / "server.log"
        server = ServerProcess("hotpath", [sys.executable, "-m", "hotpath.cli", "serve", "--model-repository",
                                           str(args.model_repository), "--port", "0", "--model-control", "explicit"],
                               log, require_serving=False).start()
        target = server.target
    else:
        target = args.target
    fuzzer = Fuzzer(target, alive=(lambda: server.process.poll() is None) if server else (lambda: True))
    start = time.monotonic()
    try:
        fuzzer.run(args.examples, served_models(target))
    finally:
        fuzzer.close()
        if server is not None:
            server.stop()
    print(f"{sum(fuzzer.statuses.values())} calls in {time.monotonic() - start:.0f} s, slowest {fuzzer.slowest_s * 1000:.0f} ms: "
          + ", ".join(f"{code} {n}" for code, n in fuzzer.statuses.most_common()))


if __name__ == "__main__":
    main()
