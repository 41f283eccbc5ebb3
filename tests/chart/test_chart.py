"""The Helm chart, rendered by Helm's own engine and checked against Kubernetes' and KubeRay's schemas.

Every value set renders, lints clean, and validates; its farm.toml loads with renderfarm's own
loader into exactly the pools it sets; and the security properties hold for each.
"""

import copy
import re
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from renderfarm.cluster.config_file import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "renderfarm"
# shared/ lies beside the repository (in CI too).
RAYCLUSTER_CRD = ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayclusters.yaml"
RELEASE, NAMESPACE = "farm", "render"
RELEASE_LABELS = {"app.kubernetes.io/name": "renderfarm", "app.kubernetes.io/instance": RELEASE}
# Kinds whose schemas are CRDs, not Kubernetes': RayCluster is checked against KubeRay's CRD.
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor"}
# Ray's GCS, dashboard, client, dashboard agent and metrics (KubeRay's head Service names 8080 whatever the chart
# does; nothing scrapes it), and a sample of the raylets' object-manager and worker ports.
RAY_PORTS = [6379, 8265, 10001, 52365, 8080, 8076, 10002, 19999]
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY")

WORKER = {
    "replicas": 1,
    "gpus": 1,
    "shmSize": "4Gi",
    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
VALUE_SETS = {
    "defaults": {},
    "two-gpu-groups": {
        "ray": {
            "workerGroups": [
                {**WORKER, "name": "a100", "replicas": 2, "gpus": 4, "nodeSelector": {"gpu": "a100"}},
                {**WORKER, "name": "l4", "gpus": 1, "nodeSelector": {"gpu": "l4"}, "rayStartParams": {"num-cpus": 6}},
            ]
        },
        "farm": {
            "max_batch": 16,
            "encoders": {"replicas": 2, "num_gpus": 0.25},
            "denoisers": {"replicas": 6, "num_gpus": 1},
            "decoders": {"replicas": 3, "num_gpus": 0.5},
            "limits": {"max_steps": 150},
        },
        "scheduler": {"service": {"type": "LoadBalancer"}},
    },
    "autoscaling": {
        "ray": {
            "autoscaling": {"enabled": True, "upscalingMode": "Conservative"},
            "workerGroups": [{**WORKER, "name": "gpu", "minReplicas": 0, "maxReplicas": 8}],
        },
        "persistence": {"modelCache": {"enabled": True, "storageClassName": "nfs"}},
    },
    "secrets": {
        "secrets": {
            "apiToken": {"existingSecret": "farm-api"},
            "objectStore": {"existingSecret": "farm-s3"},
            "huggingface": {"existingSecret": "farm-hf"},
            "rayAuth": {"existingSecret": "farm-ray"},
        },
        # An endpoint without a bucket: s3:// models, results on the volume.
        "storage": {"s3": {"endpoint": "http://minio.storage:9000"}},
        "persistence": {"output": {"existingClaim": "renders"}, "modelCache": {"enabled": True}},
    },
    "s3-results": {
        "storage": {"s3": {"bucket": "renders", "prefix": "team-a", "endpoint": "http://minio.storage:9000"}},
        "secrets": {"objectStore": {"existingSecret": "farm-s3"}},
        "ray": {"workerGroups": [{**WORKER, "name": "a100", "gpus": 2}, {**WORKER, "name": "l4"}]},
    },
    "monitoring": {
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "scrapeFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
        "networkPolicy": {"schedulerFrom": [{"namespaceSelector": {}}]},
        # A NodePort Service beside the metrics Service, and ports of their own.
        "scheduler": {"service": {"type": "NodePort"}, "metricsPort": 9100, "webPort": 8081},
    },  # fmt: skip
    "teams": {
        "secrets": {
            "keysFile": {"existingSecret": "farm-keys"},
            "tls": {"existingSecret": "farm-tls", "clientCa": {"existingSecret": "farm-client-ca"}},
        },
        "scheduler": {"service": {"type": "LoadBalancer"}},
    },
    "example": yaml.safe_load((CHART / "examples" / "gpu-farm.yaml").read_text()),
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict) -> list[dict]:
    manifests = chart.render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request, chart):
    """(values as merged with the chart's defaults, rendered manifests) of each value set."""
    values = VALUE_SETS[request.param]
    return chart.merge_values(copy.deepcopy(values)), render(chart, values)


def kube_version() -> str:
    """The oldest Kubernetes the chart supports, from Chart.yaml's kubeVersion (">=1.27.0-0")."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", constraint).group(1)


def one(manifests: list[dict], kind: str) -> dict:
    (manifest,) = [m for m in manifests if m["kind"] == kind]
    return manifest


def pod_templates(manifests: list[dict]) -> dict[str, dict]:
    """Every pod the release makes, by role: the scheduler's and each Ray group's template."""
    raycluster = one(manifests, "RayCluster")["spec"]
    pods = {"scheduler": one(manifests, "Deployment")["spec"]["template"]}
    pods["ray-head"] = raycluster["headGroupSpec"]["template"]
    for group in raycluster["workerGroupSpecs"]:
        pods[f"ray-worker/{group['groupName']}"] = group["template"]
    return pods


def env(container: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def farm_toml(manifests: list[dict]) -> str:
    return one(manifests, "ConfigMap")["data"]["farm.toml"]


def farm_config(manifests: list[dict], tmp_path: Path):
    """The rendered farm.toml, as renderfarm's own loader reads it."""
    path = tmp_path / "farm.toml"
    path.write_text(farm_toml(manifests))
    return load_config(path)


# Rendering, lint and schemas


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_is_clean(name):
    report = helm.lint(CHART, copy.deepcopy(VALUE_SETS[name]), strict=True, kube_version=f"v{kube_version()}")
    problems = [message for message in report["messages"] if message["severity"] >= 2]  # warnings and errors
    assert report["errors"] == [] and problems == []


def test_manifests_match_the_kubernetes_schemas(rendered):
    _, manifests = rendered
    for manifest in manifests:
        if manifest["kind"] not in CUSTOM_KINDS:
            # strict: unknown fields fail too, as the API server's strict field validation does.
            kubernetes_validate.validate(manifest, kube_version(), strict=True)


@pytest.fixture(scope="module")
def raycluster_schema():
    crd = yaml.load(RAYCLUSTER_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return json_schema(version["schema"]["openAPIV3Schema"])


def json_schema(node):
    """An OpenAPI v3 structural schema as JSON Schema, closed to unknown fields as strict validation is."""
    if isinstance(node, list):
        return [json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: json_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.pop("nullable", False) and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def test_the_raycluster_matches_kuberays_crd(rendered, raycluster_schema):
    _, manifests = rendered
    raycluster = one(manifests, "RayCluster")
    assert raycluster["apiVersion"] == "ray.io/v1"
    jsonschema.validate(raycluster, raycluster_schema, cls=jsonschema.Draft7Validator)


def test_the_crd_check_catches_a_misspelt_field(chart, raycluster_schema):
    raycluster = one(render(chart, {}), "RayCluster")
    raycluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(raycluster, raycluster_schema, cls=jsonschema.Draft7Validator)


# The chart and the code agree


def test_farm_toml_loads_into_the_pools_the_values_set(rendered, tmp_path):
    values, manifests = rendered
    config = farm_config(manifests, tmp_path)

    for pool in ("encoders", "denoisers", "decoders", "upscalers"):
        loaded, wanted = getattr(config, pool), values["farm"][pool]
        assert (loaded.replicas, loaded.num_gpus, loaded.num_cpus) == (
            wanted["replicas"], wanted["num_gpus"], wanted["num_cpus"]), pool  # fmt: skip
    assert config.max_batch == values["farm"]["max_batch"]
    for name, value in values["farm"]["limits"].items():
        assert getattr(config.limits, name) == value
    assert (config.host, config.port) == ("0.0.0.0", values["scheduler"]["port"])
    # Both always served: farm.toml cannot spell None, so the chart writes both.
    ports = values["scheduler"]
    assert (config.metrics_port, config.web_port) == (ports["metricsPort"], ports["webPort"])
    written = tomllib.loads(farm_toml(manifests))
    assert (written["metrics_port"], written["web_port"]) == (config.metrics_port, config.web_port)
    assert config.ray_address == f"{one(manifests, 'RayCluster')['metadata']['name']}-head-svc:6379"


def test_the_scheduler_mounts_what_farm_toml_names(rendered, tmp_path):
    values, manifests = rendered
    config = farm_config(manifests, tmp_path)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {mount["name"]: Path(mount["mountPath"]) for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}

    assert (mounts["state"], mounts.get("output"), mounts["model-cache"]) == (
        config.state_dir, config.output_dir, config.model_cache_dir)  # fmt: skip
    assert f"renderfarm serve --config {mounts['config'] / 'farm.toml'}" in container["command"][-1]
    assert volumes["config"]["configMap"]["name"] == one(manifests, "ConfigMap")["metadata"]["name"]
    claims = {m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"}
    for name in ("state", "output") if config.output_dir else ("state",):
        claim = volumes[name]["persistentVolumeClaim"]["claimName"]
        assert claim in claims or claim == values["persistence"][name]["existingClaim"]
    assert port_of(container, "grpc") == values["scheduler"]["port"] == config.port
    assert port_of(container, "metrics") == values["scheduler"]["metricsPort"] == config.metrics_port
    assert port_of(container, "web") == values["scheduler"]["webPort"] == config.web_port


@pytest.mark.parametrize(
    "farm",
    [
        {"state_dir": "/data"},
        {"output": "s3://renders"},
        {"auth": {"keys_file": "/keys.toml"}},
        {"tls_cert_file": "/cert.pem"},
        {"metrics_port": 9100},
        {"web_port": 8081},
    ],
)
def test_the_chart_refuses_farm_keys_it_sets_itself(chart, farm):
    (key,) = farm
    with pytest.raises(helm.HelmRenderError, match=f"farm.{key} is set by the chart"):
        render(chart, {"farm": farm})


@pytest.mark.parametrize(
    "scheduler, message",
    [
        ({"webPort": None}, r"scheduler.webPort must be a port, 1-65535 \(got <nil>\): the web page is always on"),
        ({"webPort": 0}, r"scheduler.webPort must be a port, 1-65535 \(got 0\)"),
        ({"metricsPort": 0}, r"scheduler.metricsPort must be a port, 1-65535 \(got 0\)"),
        ({"metricsPort": 70000}, r"scheduler.metricsPort must be a port"),
        ({"metricsPort": "9464"}, r"scheduler.metricsPort must be a port"),
        ({"metricsPort": 9464.5}, r"scheduler.metricsPort must be a port"),
        ({"webPort": 50051}, "scheduler.port and scheduler.webPort are both 50051"),
        ({"metricsPort": 8090}, "scheduler.metricsPort and scheduler.webPort are both 8090"),
    ],
)
def test_the_scheduler_ports_are_real_and_distinct(chart, scheduler, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, {"scheduler": scheduler})


def test_the_health_port_must_differ_from_the_others_only_with_tls(chart):
    with pytest.raises(helm.HelmRenderError, match="scheduler.metricsPort and scheduler.healthPort are both 9464"):
        render(chart, {"scheduler": {"healthPort": 9464}, "secrets": {"tls": {"existingSecret": "farm-tls"}}})
    render(chart, {"scheduler": {"healthPort": 9464}})  # without TLS there is no health port


@pytest.mark.parametrize("ca_secret", ["farm-client-ca", "farm-tls"])  # cert-manager's Secret carries ca.crt too
def test_the_scheduler_mounts_the_keys_file_and_tls_from_their_secrets(chart, tmp_path, ca_secret):
    values = copy.deepcopy(VALUE_SETS["teams"])
    values["secrets"]["tls"]["clientCa"]["existingSecret"] = ca_secret
    manifests = render(chart, values)
    config = farm_config(manifests, tmp_path)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {Path(mount["mountPath"]): mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}

    def secret_file(path: Path) -> tuple[str, str]:
        """(Secret, key) that a farm.toml path reads, through the mount of its directory."""
        mount = mounts[path.parent]
        # A subPath mount would never see the Secret's updates.
        assert mount["readOnly"] is True and "subPath" not in mount, path
        return volumes[mount["name"]]["secret"]["secretName"], path.name

    assert secret_file(config.auth.keys_file) == ("farm-keys", "keys.toml")
    assert secret_file(config.tls_cert_file) == ("farm-tls", "tls.crt")
    assert secret_file(config.tls_key_file) == ("farm-tls", "tls.key")
    assert secret_file(config.tls_client_ca_file) == (ca_secret, "ca.crt")
    assert config.health_port == 50052 == port_of(container, "health")


def test_a_client_ca_without_tls_is_refused(chart):
    with pytest.raises(helm.HelmRenderError, match="secrets.tls.clientCa needs secrets.tls.existingSecret"):
        render(chart, {"secrets": {"tls": {"clientCa": {"existingSecret": "farm-ca"}}}})


def test_s3_results_farm_toml_names_the_bucket_not_a_directory(chart, tmp_path):
    config = farm_config(render(chart, VALUE_SETS["s3-results"]), tmp_path)
    assert config.output == "s3://renders/team-a" and config.output_dir is None


@pytest.mark.parametrize(
    "prefix, output",
    [
        ("team-a", "s3://renders/team-a"),
        ("/team-a/", "s3://renders/team-a"),
        ("a/b/", "s3://renders/a/b"),
        ("", "s3://renders"),
        ("/", "s3://renders"),
    ],
)
def test_the_s3_prefix_loses_its_edge_slashes(chart, prefix, output):
    manifests = render(chart, {"storage": {"s3": {"bucket": "renders", "prefix": prefix}}})
    written = tomllib.loads(farm_toml(manifests))
    assert written["output"] == output and "output_dir" not in written


def test_s3_results_need_no_output_volume(chart):
    manifests = render(chart, VALUE_SETS["s3-results"])
    claims = [m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    assert claims == ["farm-renderfarm-state"]
    for role, template in pod_templates(manifests).items():
        pod = template["spec"]
        assert "output" not in {volume["name"] for volume in pod["volumes"]}, role
        for container in pod["containers"]:
            assert "output" not in {mount["name"] for mount in container["volumeMounts"]}, role


def test_the_s3_endpoint_and_credentials_reach_the_scheduler_and_every_worker(chart):
    pods = pod_templates(render(chart, VALUE_SETS["s3-results"]))
    writers = {role: t for role, t in pods.items() if role == "scheduler" or role.startswith("ray-worker/")}
    assert len(writers) == 3
    for role, template in writers.items():
        for container in template["spec"]["containers"]:
            variables = env(container)
            assert variables["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000", role
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert variables[name]["valueFrom"]["secretKeyRef"] == {"name": "farm-s3", "key": name}, role


def test_the_old_object_store_endpoint_is_refused(chart):
    values = {"secrets": {"objectStore": {"endpointUrl": "http://minio.storage:9000"}}}
    with pytest.raises(helm.HelmRenderError, match="secrets.objectStore.endpointUrl moved to storage.s3.endpoint"):
        render(chart, values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"storage": {"s3": {"bucket": "s3://renders"}}}, "is not a bucket name"),
        ({"storage": {"s3": {"bucket": "renders/team-a"}}}, "is not a bucket name"),
        (
            {"storage": {"s3": {"bucket": "renders"}}, "persistence": {"output": {"existingClaim": "renders"}}},
            "results go to the bucket or to the volume, not both",
        ),
    ],
)
def test_contradictory_s3_results_are_refused(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


def test_a_worker_group_without_a_gpu_is_refused(chart):
    with pytest.raises(helm.HelmRenderError, match=r"ray.workerGroups\[cpu\].gpus must be at least 1"):
        render(chart, {"ray": {"workerGroups": [{**WORKER, "name": "cpu", "gpus": 0}]}})


# Properties


def test_every_worker_group_has_its_gpu_limit(rendered):
    values, manifests = rendered
    groups = one(manifests, "RayCluster")["spec"]["workerGroupSpecs"]
    assert [group["groupName"] for group in groups] == [group["name"] for group in values["ray"]["workerGroups"]]
    for group, wanted in zip(groups, values["ray"]["workerGroups"]):
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == wanted["gpus"] >= 1
        # /dev/shm is Ray's object store: in memory, not on the container's disk.
        (shm,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_autoscaling_bounds_come_from_the_values(rendered):
    values, manifests = rendered
    spec = one(manifests, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is values["ray"]["autoscaling"]["enabled"]
    for group, wanted in zip(spec["workerGroupSpecs"], values["ray"]["workerGroups"]):
        bounds = (wanted.get("minReplicas", wanted["replicas"]), wanted.get("maxReplicas", wanted["replicas"]))
        assert (group["minReplicas"], group["maxReplicas"]) == bounds
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_the_scheduler_is_probed_over_grpc_health(rendered, tmp_path):
    values, manifests = rendered
    config = farm_config(manifests, tmp_path)
    deployment = one(manifests, "Deployment")["spec"]
    assert deployment["strategy"]["type"] == "Recreate" and deployment["replicas"] == 1
    (container,) = deployment["template"]["spec"]["containers"]
    # Kubernetes' gRPC probes cannot speak TLS: with TLS on, they use the plaintext health port.
    if values["secrets"]["tls"]["existingSecret"]:
        probed = values["scheduler"]["healthPort"]
        assert port_of(container, "health") == config.health_port == probed and config.tls_cert_file
    else:
        probed = port_of(container, "grpc")
        assert config.health_port is None and config.tls_cert_file is None
        assert "health" not in {port["name"] for port in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == probed, probe


def test_no_container_runs_as_root(rendered):
    _, manifests = rendered
    for role, template in pod_templates(manifests).items():
        pod = template["spec"]
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", role
        for container in pod["containers"]:
            effective = {**pod["securityContext"], **container["securityContext"]}
            assert effective["runAsNonRoot"] is True and effective["runAsUser"] != 0, role
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, role
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], role
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, role
            # The read-only root is workable because /tmp (Ray's session directory, HOME) is writable.
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], role
    autoscaler = one(manifests, "RayCluster")["spec"].get("autoscalerOptions")
    if autoscaler:
        assert autoscaler["securityContext"]["runAsNonRoot"] is True and autoscaler["securityContext"]["runAsUser"]


def admitting_rules(policies: list[dict], pod_labels: dict, port: int) -> list[dict] | None:
    """The ingress rules that admit `port` on a pod with these labels; None if no policy isolates the pod."""
    selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
    if not any("Ingress" in p["spec"]["policyTypes"] for p in selecting):
        return None
    return [
        rule
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
        if "ports" not in rule or any(entry["port"] == port for entry in rule["ports"])
    ]


def test_rays_ports_admit_only_pods_of_the_release(rendered):
    values, manifests = rendered
    policies = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    for role, template in pod_templates(manifests).items():
        labels = template["metadata"]["labels"]
        assert labels.items() >= RELEASE_LABELS.items(), role
        for port in RAY_PORTS:
            rules = admitting_rules(policies, labels, port)
            assert rules, f"{role}: no policy isolates port {port}, or none admits the release's own pods"
            for rule in rules:
                assert rule.get("from") == [{"podSelector": {"matchLabels": RELEASE_LABELS}}], (role, port)
    # The scheduler's gRPC port admits the configured peers (all, when none are named).
    scheduler_labels = pod_templates(manifests)["scheduler"]["metadata"]["labels"]
    froms = [rule.get("from") for rule in admitting_rules(policies, scheduler_labels, values["scheduler"]["port"])]
    assert (values["networkPolicy"]["schedulerFrom"] or None) in froms


def test_the_web_page_admits_whom_grpc_admits_and_metrics_only_the_scrapers(rendered):
    values, manifests = rendered
    policies = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    scheduler = pod_templates(manifests)["scheduler"]["metadata"]["labels"]
    ports = values["scheduler"]

    def froms(port: int) -> list:
        return [rule.get("from") for rule in admitting_rules(policies, scheduler, port)]

    release = [{"podSelector": {"matchLabels": RELEASE_LABELS}}]
    clients = values["networkPolicy"]["schedulerFrom"] or None
    assert froms(ports["webPort"]) == froms(ports["port"]) == [release, clients]
    # /metrics has no token: outside the release only the ServiceMonitor's scrapers, and only with it.
    monitoring = values["serviceMonitor"]
    scrapers = [monitoring["scrapeFrom"] or None] if monitoring["enabled"] else []
    assert froms(ports["metricsPort"]) == [release, *scrapers]
    assert any(m["kind"] == "ServiceMonitor" for m in manifests) is monitoring["enabled"]


def services(manifests: list[dict]) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}


def target(service: dict, name: str, container: dict) -> int:
    """The container port that the Service's port `name` reaches, as its port number too."""
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == name]
    assert port["targetPort"] == name and port["port"] == port_of(container, name)
    return port["port"]


def test_the_users_service_carries_grpc_and_the_web_page_never_metrics(rendered):
    values, manifests = rendered
    service = services(manifests)["farm-renderfarm"]
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["type"] == values["scheduler"]["service"]["type"]
    assert [port["name"] for port in service["spec"]["ports"]] == ["grpc", "web"]
    assert target(service, "grpc", container) == values["scheduler"]["port"]
    assert target(service, "web", container) == values["scheduler"]["webPort"]


def test_the_service_monitor_scrapes_the_schedulers_metrics_port(rendered):
    values, manifests = rendered
    if not values["serviceMonitor"]["enabled"]:
        assert "farm-renderfarm-metrics" not in services(manifests)
        return
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"].items() >= values["serviceMonitor"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (
        "metrics", "/metrics", values["serviceMonitor"]["interval"])  # fmt: skip
    assert endpoint.get("scheme", "http") == "http"  # /metrics is plaintext even with secrets.tls
    # It selects the metrics Service alone, whose selector is the scheduler pod's.
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in services(manifests).values() if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["farm-renderfarm-metrics"]
    (service,) = selected
    assert service["spec"]["type"] == "ClusterIP"  # in-cluster whatever scheduler.service.type is
    pod = one(manifests, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert [port["name"] for port in service["spec"]["ports"]] == ["metrics"]
    (container,) = pod["spec"]["containers"]
    assert target(service, "metrics", container) == values["scheduler"]["metricsPort"]


def test_no_service_exposes_ray(rendered):
    values, manifests = rendered
    names = ["farm-renderfarm"] + (["farm-renderfarm-metrics"] if values["serviceMonitor"]["enabled"] else [])
    assert list(services(manifests)) == names  # the README's, and the scraper's
    assert one(manifests, "RayCluster")["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    for service in services(manifests).values():
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == "scheduler"
        assert not {port["port"] for port in service["spec"]["ports"]} & set(RAY_PORTS)
        if service["spec"]["type"] != "ClusterIP":
            assert values["scheduler"]["metricsPort"] not in {port["port"] for port in service["spec"]["ports"]}


def test_no_secret_is_in_plaintext(rendered):
    _, manifests = rendered
    assert not [m for m in manifests if m["kind"] == "Secret"]
    for role, template in pod_templates(manifests).items():
        for container in template["spec"]["containers"]:
            for name, variable in env(container).items():
                if SECRET_ENV.search(name):
                    assert "value" not in variable and variable["valueFrom"]["secretKeyRef"]["name"], (role, name)


def test_referenced_secrets_reach_the_pods_that_use_them(chart):
    manifests = render(chart, VALUE_SETS["secrets"])
    pods = pod_templates(manifests)
    scheduler = env(pods["scheduler"]["spec"]["containers"][0])
    (worker,) = [env(t["spec"]["containers"][0]) for role, t in pods.items() if role.startswith("ray-worker")]

    def secret(variable: dict) -> tuple[str, str]:
        reference = variable["valueFrom"]["secretKeyRef"]
        return reference["name"], reference["key"]

    assert secret(scheduler["RENDERFARM_TOKEN"]) == ("farm-api", "token")
    assert "RENDERFARM_TOKEN" not in worker
    for variables in (scheduler, worker):
        assert secret(variables["AWS_ACCESS_KEY_ID"]) == ("farm-s3", "AWS_ACCESS_KEY_ID")
        assert secret(variables["AWS_SECRET_ACCESS_KEY"]) == ("farm-s3", "AWS_SECRET_ACCESS_KEY")
        assert variables["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
        assert secret(variables["HF_TOKEN"]) == ("farm-hf", "HF_TOKEN")
    # Ray's token: KubeRay hands it to Ray's pods; the scheduler joins with the same one.
    assert one(manifests, "RayCluster")["spec"]["authOptions"] == {"mode": "token", "secretName": "farm-ray"}
    assert secret(scheduler["RAY_AUTH_TOKEN"]) == ("farm-ray", "auth_token")
    assert scheduler["RAY_AUTH_MODE"]["value"] == "token"


def test_without_secrets_no_credential_is_passed(chart):
    pods = pod_templates(render(chart, {}))
    for template in pods.values():
        assert not [name for name in env(template["spec"]["containers"][0]) if SECRET_ENV.search(name)]


def port_of(container: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port
