"""The Kubernetes and KServe manifests under deploy/ against the real schemas: Kubernetes' own
(kubernetes-validate, strict: an unknown field fails) and KServe's CRDs (their openAPIV3Schema, with
unknown fields refused as the API server's pruning would drop them), and against hotpath itself:
every setting they pass is one `hotpath serve` accepts."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hotpath.cli import build_parser
from hotpath.cli.environment import InvalidVariable
from hotpath.settings import Settings, grpc_threads

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
KSERVE_CRDS = ROOT.parent / "shared" / "kserve"
requires_kserve_crds = pytest.mark.skipif(not KSERVE_CRDS.is_dir(),
                                          reason=f"KServe's CRD schemas are not in {KSERVE_CRDS} (the project's shared folder, beside the checkout)")
KUBERNETES_VERSION = "1.30"
"""Oldest Kubernetes the manifests target; gRPC probes are GA since 1.27."""


def _documents(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [document for document in yaml.load_all(path.read_text(), Loader=loader) if document]


def _objects(folder: Path) -> list[tuple[Path, dict]]:
    return [(path, document) for path in sorted(folder.rglob("*.yaml")) if path.name != "kustomization.yaml"
            for document in _documents(path)]


def _by_kind(folder: Path, kind: str) -> dict:
    (found,) = [document for path, document in _objects(folder) if document["kind"] == kind
                and path.parent == folder]
    return found


@pytest.mark.parametrize(("path", "document"), _objects(KUBERNETES),
                         ids=lambda value: value.name if isinstance(value, Path) else value.get("kind"))
def test_kubernetes_objects_validate_strictly(path: Path, document: dict):
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path.relative_to(ROOT)}: {document['kind']} {document['metadata']['name']}: {exc}")


def test_every_manifest_is_in_a_kustomization_and_every_resource_exists():
    listed = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for entry in [*spec.get("resources", ()), *(patch["path"] for patch in spec.get("patches", ()))]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization.relative_to(ROOT)} names {entry}, which does not exist"
            listed.add(target)
    manifests = {path.resolve() for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml"}
    assert manifests <= listed, f"not in any kustomization: {sorted(str(path) for path in manifests - listed)}"


def _crd_schema(kind: str, version: str) -> dict:
    for crd in _documents(KSERVE_CRDS / f"serving.kserve.io_{kind.lower()}s.yaml"):
        for served in crd["spec"]["versions"]:
            if served["name"] == version:
                return _refuse_unknown_fields(served["schema"]["openAPIV3Schema"])
    raise LookupError(f"no CRD schema for {kind} {version} in {KSERVE_CRDS}")


def _refuse_unknown_fields(schema: dict) -> dict:
    """The schema with every object that lists its properties closed to others, as pruning would drop
    them silently, unless it says x-kubernetes-preserve-unknown-fields."""
    schema = copy.deepcopy(schema)
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return schema


@requires_kserve_crds
@pytest.mark.parametrize("path", sorted(KSERVE.glob("*.yaml")), ids=lambda path: path.name)
def test_kserve_objects_validate_against_the_crds(path: Path):
    for document in _documents(path):
        group, version = document["apiVersion"].split("/")
        assert group == "serving.kserve.io"
        schema = _crd_schema(document["kind"], version)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=lambda error: list(error.path))
        assert not errors, "\n".join(f"{path.name}: {'.'.join(map(str, error.path))}: {error.message}" for error in errors)


@requires_kserve_crds
def test_the_crd_check_catches_a_misspelt_field():
    runtime = _documents(KSERVE / "servingruntime.yaml")[0]
    runtime["spec"]["protocolVersion"] = ["grpc-v2"]
    assert not jsonschema.Draft7Validator(_crd_schema("ServingRuntime", "v1alpha1")).is_valid(runtime)


def _serve_args(container: dict, monkeypatch: pytest.MonkeyPatch):
    """`hotpath serve` as the container runs it: the image's entrypoint is `hotpath`, its command `serve`."""
    for variable in container.get("env", ()):
        assert variable["name"].startswith("HOTPATH_"), variable
        monkeypatch.setenv(variable["name"], variable["value"])
    args = build_parser().parse_args(container.get("args", ["serve"]))
    assert args.command == "serve"
    invalid = [value for value in vars(args).values() if isinstance(value, InvalidVariable)]
    assert not invalid, invalid
    return args


def test_the_deployment_passes_hotpath_settings_it_accepts_and_probes_its_ports(monkeypatch):
    deployment = _by_kind(KUBERNETES, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = _serve_args(container, monkeypatch)
    variables = {variable["name"] for variable in container["env"]}
    assert {"HOTPATH_MODEL_REPOSITORY", "HOTPATH_HOST", "HOTPATH_PORT"} <= variables
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert container["livenessProbe"]["grpc"] == container["startupProbe"]["grpc"] == {"port": args.port, "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": args.port}
    assert pod["terminationGracePeriodSeconds"] >= args.drain_s + args.grace_s + 1
    assert args.drain_s >= 2 * container["readinessProbe"]["periodSeconds"]
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert str(args.model_repository) in mounts


def test_cpu_requests_are_whole_cpus_equal_to_the_limits_the_thread_tuning_reads():
    (container,) = _by_kind(KUBERNETES, "Deployment")["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    cpus = int(resources["limits"]["cpu"])
    assert grpc_threads(Settings(cpus=cpus)) == 2


def test_the_serving_runtime_runs_hotpath_as_kserve_expects(monkeypatch):
    runtime = _documents(KSERVE / "servingruntime.yaml")[0]
    (container,) = runtime["spec"]["containers"]
    args = _serve_args(container, monkeypatch)
    assert (str(args.model_repository), args.host) == ("/mnt/models", "0.0.0.0")
    assert container["ports"] == [{"name": "h2c", "containerPort": args.port, "protocol": "TCP"}]
    assert container["livenessProbe"]["grpc"] == {"port": args.port, "service": "liveness"}
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    service = _documents(KSERVE / "inferenceservice.yaml")[0]
    predictor = service["spec"]["predictor"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
