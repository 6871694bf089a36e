"""The Helm chart rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK), for
every values file in k8s/unlocked/ci: linted, every core object checked against
Kubernetes' schemas, every KubeRay object against KubeRay 1.7.0's fields, and bad values
rejected with a message that names them."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from tests.conftest import free_port
from tests.deploy.kuberay_schema import KUBERAY_VERSION, NAME_LIMITS, SCHEMAS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "unlocked"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES = "1.33.0"
RAY_KINDS = ("RayCluster", "RayJob")


def values_of(path: Path | None) -> dict:
    values = yaml.safe_load(path.read_text()) if path else {}
    if values.get("mode") == "job":
        values.setdefault("job", {})["configYaml"] = (
            REPO / "examples" / "pipeline.yaml"
        ).read_text()
    return values


def render(values: dict, name: str = "demo") -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=name, namespace="ml", is_install=True)
    objects = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            objects += [o for o in yaml.safe_load_all(text) if o]
    return objects


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def workers(**changes: object) -> dict:
    """Values with one worker group, changed as given."""
    group = {"name": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "resources": {}}
    return {"ray": {"workerGroups": [{**group, **changes}]}}


def ray_cluster_spec(objects: list[dict]) -> dict:
    (ray,) = [o for o in objects if o["kind"] in RAY_KINDS]
    return ray["spec"]["rayClusterSpec"] if ray["kind"] == "RayJob" else ray["spec"]


def test_the_chart_targets_the_kuberay_version_its_fields_are_checked_against():
    with helm.Chart.load(CHART) as chart:
        assert chart.metadata["annotations"]["unlocked.dev/kuberay-version"] == KUBERAY_VERSION


def test_helm_lint_finds_nothing():
    for path in [None, *VALUES]:
        result = helm.lint(str(CHART), values=values_of(path), strict=True, namespace="ml")
        findings = [m for m in result["messages"] if m["severity"] > 1]  # above info
        assert not findings and not result["errors"], (path, result)


@pytest.mark.parametrize("path", [None, *VALUES], ids=lambda p: p.stem if p else "defaults")
def test_every_object_is_valid_for_kubernetes_and_kuberay(path):
    objects = render(values_of(path))
    assert objects
    for obj in objects:
        if obj["kind"] in RAY_KINDS:
            jsonschema.validate(obj, SCHEMAS[obj["kind"]])
            assert len(obj["metadata"]["name"]) <= NAME_LIMITS[obj["kind"]]
            spec = ray_cluster_spec([obj])
            groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
            for group in groups:
                template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
                kubernetes_validate.validate(
                    {**template, "template": group["template"]}, KUBERNETES, strict=True
                )
        else:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_defaults_authenticate_everything_and_expose_nothing():
    objects = render({})
    spec = ray_cluster_spec(objects)
    token = spec["authOptions"]
    assert token["mode"] == "token"
    (secret,) = [
        s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == token["secretName"]
    ]
    assert set(secret["data"]) == {"auth_token"}
    assert all(
        s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in by_kind(objects, "Service")
    )
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"

    (mlflow,) = by_kind(objects, "Deployment")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name basic-auth" in container["args"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    # No secret value is written into a pod spec; they come from Secrets.
    assert all("value" not in e for n, e in env.items() if "PASSWORD" in n or "KEY" in n)

    ray_env = {
        e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert ray_env["MLFLOW_TRACKING_URI"]["value"] == "http://demo-unlocked-mlflow.ml.svc:5000"
    assert "secretKeyRef" in ray_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
    assert ray_env["UNLOCKED_CHECKPOINT_ROOT"]["value"] == "/mnt/unlocked/checkpoints"


def test_gpu_workers_get_gpus_the_cuda_image_and_the_autoscaler():
    spec = ray_cluster_spec(render(values_of(CHART / "ci" / "gpu-values.yaml")))
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "unlocked:gpu"
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}


def test_rayjob_runs_the_config_shipped_in_its_configmap():
    objects = render(values_of(CHART / "ci" / "rayjob-values.yaml"))
    assert not by_kind(objects, "RayCluster")
    (job,) = by_kind(objects, "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words == [
        "python", "-m", "orchestrator", "run", "/etc/unlocked/run.yaml",
        "--set-from", "/etc/unlocked/overrides.yaml",
    ]  # fmt: skip
    (config_map,) = by_kind(objects, "ConfigMap")
    assert yaml.safe_load(config_map["data"]["overrides.yaml"]) == ["stop.max_steps=100"]
    assert yaml.safe_load(config_map["data"]["run.yaml"])["strategy"]["kind"] == "pipeline"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert mounts["run-config"] == "/etc/unlocked"
    assert volumes["run-config"]["configMap"]["name"] == config_map["metadata"]["name"]


def test_external_mlflow_creates_no_server_and_logs_there():
    objects = render(values_of(CHART / "ci" / "external-mlflow-values.yaml"))
    assert not by_kind(objects, "Deployment") and not by_kind(objects, "PersistentVolumeClaim")
    env = ray_cluster_spec(objects)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    values = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"]["name"] for e in env}
    assert values["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert values["MLFLOW_TRACKING_PASSWORD"] == "mlflow-login"
    assert values["UNLOCKED_CHECKPOINT_ROOT"] == "s3://bucket/unlocked/checkpoints"
    # Checkpoints in a bucket: the MLflow buffer goes to the one writable local place.
    assert values["UNLOCKED_TRACKING_BUFFER"].startswith("/tmp/")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "jobs"}, "/mode"),
        ({"mode": "job"}, "/job"),
        (workers(name="CPU"), "/ray/workerGroups/0/name"),
        (workers(replicas=-1), "/ray/workerGroups/0/replicas"),
        ({"ray": {"head": {"rayStartParams": {"num-cpus": 0}}}}, "/ray/head/rayStartParams"),
        ({"ray": {"head": {"cpus": 2}}}, "/ray/head"),
        ({"mlflow": {"enabled": False}}, "/mlflow/external"),
        ({"mlflow": {"backendStore": {"kind": "postgresql"}}}, "/mlflow/backendStore"),
        ({"mlflow": {"backendStore": {"kind": "mysql"}}}, "/mlflow/backendStore/kind"),
        ({"mlflow": {"service": {"type": "Ingress"}}}, "/mlflow/service/type"),
    ],
)  # fmt: skip
def test_bad_values_are_rejected_by_the_schema(values, message):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as err:
        chart.validate_schema(values)
    assert message in str(err.value)
    with pytest.raises(helm.HelmError):
        render(values)  # helm install would refuse it too


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (workers(replicas=5), "needs minReplicas <= replicas <= maxReplicas"),
        ({"ray": {"version": "2.40.0"}}, "needs Ray >= 2.52.0"),
        ({"storage": {"volume": {"enabled": False}}}, "set storage.checkpointRoot"),
    ],
)  # fmt: skip
def test_inconsistent_values_fail_with_the_fix(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_secrets_are_generated_once_and_not_shared_between_releases():
    first, second = render({}, name="a"), render({}, name="b")
    tokens = [
        {s["metadata"]["name"]: s["data"] for s in by_kind(objects, "Secret")}
        for objects in (first, second)
    ]
    assert tokens[0]["a-unlocked-ray-token"] != tokens[1]["b-unlocked-ray-token"]
    assert all(s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
               for s in by_kind(first, "Secret"))  # fmt: skip


@pytest.mark.slow
def test_the_rendered_mlflow_command_serves_with_basic_auth(tmp_path):
    """The MLflow container's own shell command, run here with its volume under tmp_path."""
    (mlflow,) = by_kind(render({}), "Deployment")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    port = free_port()

    def moved(text: str) -> str:  # the pod's /mlflow volume and /tmp, here under tmp_path
        return re.sub(r"/(mlflow|tmp)/", f"{tmp_path}/", text)

    script = moved(container["args"][0])
    script = script.replace("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")
    secrets = {"username": "admin", "password": "a-long-s3cret-pass", "flask-secret-key": "k" * 32}
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    for item in container["env"]:
        if "valueFrom" in item:
            env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[item["name"]] = moved(item["value"])
    server = subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, "the MLflow command exited"
            try:
                requests.get(f"{url}/health", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert requests.get(search, timeout=10).status_code == 401
        assert requests.get(search, auth=("admin", "a-long-s3cret-pass"), timeout=10).ok
        # The Service's own name is an allowed Host header (MLflow rejects unknown ones).
        named = requests.get(search, auth=("admin", "a-long-s3cret-pass"), timeout=10,
                             headers={"Host": "demo-unlocked-mlflow.ml.svc:5000"})  # fmt: skip
        assert named.ok
        assert (tmp_path / "mlflow.db").exists() and (tmp_path / "auth.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


HOSTILE_OVERRIDES = [
    "tracking.experiment=it's",
    "stop.max_steps=1'; touch pwned; echo '",
    'tracking.experiment="double" $(touch pwned) `touch pwned` ${HOME}; exit 3 | cat & \\',
]


def run_config(objects: list[dict]) -> dict[str, str]:
    (config_map,) = by_kind(objects, "ConfigMap")
    return config_map["data"]


def test_overrides_reach_the_run_verbatim_and_never_a_shell():
    values = values_of(CHART / "ci" / "rayjob-values.yaml")
    values["job"]["overrides"] = HOSTILE_OVERRIDES
    objects = render(values)
    (job,) = by_kind(objects, "RayJob")
    entrypoint = job["spec"]["entrypoint"]
    # Ray runs the entrypoint through a shell: it holds the chart's fixed words only.
    assert shlex.split(entrypoint) == [
        "python", "-m", "orchestrator", "run", "/etc/unlocked/run.yaml",
        "--set-from", "/etc/unlocked/overrides.yaml",
    ]  # fmt: skip
    for marker in ("'", '"', ";", "$(", "`", "pwned", "|", "&"):
        assert marker not in entrypoint
    assert yaml.safe_load(run_config(objects)["overrides.yaml"]) == HOSTILE_OVERRIDES
    # A changed override is a new job, as a changed config is.
    values["job"]["overrides"] = HOSTILE_OVERRIDES[:1]
    (changed,) = by_kind(render(values), "RayJob")
    checksum = "unlocked.dev/config-checksum"
    assert changed["metadata"]["annotations"][checksum] != job["metadata"]["annotations"][checksum]


def test_a_job_without_overrides_runs_the_config_alone():
    values = values_of(CHART / "ci" / "rayjob-values.yaml")
    values["job"]["overrides"] = []
    objects = render(values)
    (job,) = by_kind(objects, "RayJob")
    assert shlex.split(job["spec"]["entrypoint"])[-1] == "/etc/unlocked/run.yaml"
    assert set(run_config(objects)) == {"run.yaml"}


def test_the_cli_reads_the_overrides_file_the_chart_writes(tmp_path, monkeypatch):
    """The rendered entrypoint, run by the CLI on the rendered ConfigMap's files: every
    override arrives as one item, as written (needs the CLI's --set-from)."""
    from orchestrator import cli, config

    values = values_of(CHART / "ci" / "rayjob-values.yaml")
    values["job"]["overrides"] = HOSTILE_OVERRIDES
    objects = render(values)
    for name, text in run_config(objects).items():
        (tmp_path / name).write_text(text)
    (job,) = by_kind(objects, "RayJob")
    words = shlex.split(job["spec"]["entrypoint"].replace("/etc/unlocked", str(tmp_path)))
    received = []
    real_load = config.load_config

    def load_config(path, overrides=()):
        received.extend(overrides)
        return real_load(path, [])

    monkeypatch.setattr(config, "load_config", load_config)
    monkeypatch.chdir(tmp_path)
    cli.main(["validate", *words[4:]])
    assert received == HOSTILE_OVERRIDES
    assert not (tmp_path / "pwned").exists()


def containers_and_pods(objects: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container the chart itself defines."""
    pods = [("mlflow", d["spec"]["template"]["spec"]) for d in by_kind(objects, "Deployment")]
    spec = ray_cluster_spec(objects)
    pods.append(("ray-head", spec["headGroupSpec"]["template"]["spec"]))
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return [(where, pod, c) for where, pod in pods for c in pod["containers"]]


@pytest.mark.parametrize("path", [None, *VALUES], ids=lambda p: p.stem if p else "defaults")
def test_every_container_has_a_read_only_image_and_writes_only_to_its_volumes(path):
    objects = render(values_of(path))
    found = containers_and_pods(objects)
    assert found
    for where, pod, container in found:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == "/tmp", where


def test_only_the_autoscaling_head_gets_a_service_account_token():
    for values, head_token in (({}, False), (values_of(CHART / "ci" / "gpu-values.yaml"), True)):
        for where, pod, _ in containers_and_pods(render(values)):
            expected = head_token and where == "ray-head"
            assert pod["automountServiceAccountToken"] is expected, (where, values)


def network_policies(objects: list[dict]) -> dict[str, dict]:
    return {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "NetworkPolicy")}


def test_only_the_release_reaches_its_pods_and_the_operator_its_dashboard():
    policies = network_policies(render({}))
    release = {"app.kubernetes.io/instance": "demo"}
    own = policies["demo-unlocked-release-only"]
    assert own["podSelector"]["matchLabels"] == release
    assert own["ingress"] == [{"from": [{"podSelector": {"matchLabels": release}}]}]
    dashboard = policies["demo-unlocked-ray-dashboard"]
    assert dashboard["podSelector"]["matchLabels"] == {**release, "ray.io/node-type": "head"}
    (rule,) = dashboard["ingress"]
    assert rule["ports"] == [{"port": 8265, "protocol": "TCP"}]
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [operator]
    # Every Ray and MLflow pod carries the label the policies select on.
    objects = render({})
    spec = ray_cluster_spec(objects)
    (mlflow,) = by_kind(objects, "Deployment")
    for template in (
        spec["headGroupSpec"]["template"],
        *(g["template"] for g in spec["workerGroupSpecs"]),
        mlflow["spec"]["template"],
    ):
        assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"


def test_the_job_submitter_reaches_the_dashboard_and_an_empty_peer_list_opens_nothing():
    job = values_of(CHART / "ci" / "rayjob-values.yaml")
    (rule,) = network_policies(render(job))["demo-unlocked-ray-dashboard"]["ingress"]
    assert {"podSelector": {"matchLabels": {"job-name": "demo-unlocked"}}} in rule["from"]
    # No peer for the dashboard: no policy at all, since `from: []` would admit everyone.
    policies = network_policies(render({"networkPolicy": {"dashboardFrom": []}}))
    assert set(policies) == {"demo-unlocked-release-only"}
    mlflow = {"podSelector": {"matchLabels": {"app": "ingress-nginx"}}}
    policies = network_policies(render({"networkPolicy": {"mlflowFrom": [mlflow]}}))
    assert policies["demo-unlocked-mlflow"]["ingress"][0]["from"] == [mlflow]
    assert not network_policies(render({"networkPolicy": {"enabled": False}}))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
        ({"networkPolicy": {"dashboardFrom": [{}]}}, "/networkPolicy/dashboardFrom/0"),
        ({"networkPolicy": {"mlflowFrom": [{"pods": {}}]}}, "/networkPolicy/mlflowFrom/0"),
    ],
)  # fmt: skip
def test_bad_network_policy_values_are_rejected_by_the_schema(values, message):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as err:
        chart.validate_schema(values)
    assert message in str(err.value)


def test_given_secrets_are_used_as_they_are_and_renders_are_stable():
    values = {"ray": {"auth": {"existingSecret": "my-ray"}},
              "mlflow": {"auth": {"existingSecret": "my-mlflow"}}}  # fmt: skip
    first = render(values)
    assert not by_kind(first, "Secret")
    assert first == render(values)  # nothing random left: GitOps sees no change
    spec = ray_cluster_spec(first)
    assert spec["authOptions"]["secretName"] == "my-ray"
    (mlflow,) = by_kind(first, "Deployment")
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]
        if "valueFrom" in e and e["name"].startswith("MLFLOW_")
    }
    assert refs == {"my-mlflow"}


def test_generated_secrets_reuse_the_live_secret():
    """`helm install`/`upgrade` read the live Secret (``lookup``) and keep its value; with no
    cluster to ask (`helm template`), only existingSecret gives a stable render."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    kept = helpers[helpers.index('define "unlocked.keptSecret"') :]
    assert 'lookup "v1" "Secret" .namespace .name' in kept
    assert kept.index("index $live.data .key") < kept.index("randAlphaNum")
    for template in ("mlflow-auth-secret.yaml", "ray-token-secret.yaml"):
        text = (CHART / "templates" / template).read_text()
        assert "randAlpha" not in text and 'include "unlocked.keptSecret"' in text
