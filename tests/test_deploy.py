"""Deployment artefacts: Helm chart, Dockerfile, docker-compose.yml, docs/deploy.md.

None of it can run here (no cluster, no Docker engine), so it is checked by
rendering and validating offline:

- the chart is rendered and linted with helm-python-sdk, which bundles Helm's
  own Go SDK as a shared library (no helm binary, no network);
- every rendered manifest is validated with kubernetes-validate against the
  newest Kubernetes schema it ships;
- the Dockerfile and the compose file are parsed and reviewed against the
  rules of issue 6;
- the environment variables read by ``core.config.Settings`` are compared with
  docs/deploy.md and with what the chart renders.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "rebasin"
VALUES_DIR = Path(__file__).resolve().parent / "deploy_values"
DOCS = ROOT / "docs" / "deploy.md"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"

# The newest Kubernetes whose schemas kubernetes-validate ships.
KUBE_VERSION = latest_version()
RELEASE = "prod"
NAMESPACE = "ml"

# Standard AWS variables the service relies on besides its own settings.
AWS_VARS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"]
# Settings whose values are credentials: they must come from Secrets.
SECRET_VARS = {"REBASIN_DATABASE_URL", "REBASIN_BROKER_URL", "REBASIN_API_KEYS", "REBASIN_KEY_PEPPER",
               "REBASIN_CALLBACK_SECRET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

VALUE_SETS = {
    "default": None,
    "gpu": VALUES_DIR / "gpu.yaml",
    "ingress-autoscaling": VALUES_DIR / "ingress-autoscaling.yaml",
    "full": VALUES_DIR / "full.yaml",
}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def load_values(name: str) -> dict[str, Any] | None:
    path = VALUE_SETS[name]
    return None if path is None else yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Render offline and parse every manifest (NOTES.txt excluded)."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, revision=1, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                doc["metadata"].setdefault("annotations", {})
                doc["__template"] = path
                docs.append(doc)
    return docs


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__template"}


def by_kind(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['metadata']['name'] for d in by_kind(docs, kind)]}"
    return found[0]


def pod_specs(docs) -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) for every pod-creating object."""
    out = []
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}:
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((f"CronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append((f"Pod/{d['metadata']['name']}", d["spec"]))
    return out


def container_env(docs, container: dict[str, Any]) -> dict[str, Any]:
    """Effective environment of a container: ConfigMap envFrom data plus env."""
    env: dict[str, Any] = {}
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"envFrom names ConfigMap {name}, which the chart does not render"
            env.update({k: {"value": v} for k, v in configmaps[name].items()})
    for item in container.get("env", []):
        env[item["name"]] = item
    return env


def settings_env_vars() -> dict[str, Any]:
    """Env var name -> pydantic field, read from the Settings class itself."""
    prefix = Settings.model_config.get("env_prefix", "")
    out = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        out[(alias or f"{prefix}{name}").upper()] = field
    return out


# --------------------------------------------------------------------------
# chart: render, lint, validate
# --------------------------------------------------------------------------

def test_helm_sdk_is_the_real_helm():
    """helm-python-sdk wraps Helm's Go SDK (v4), shipped inside the wheel."""
    assert Path(helm.library_path).exists()
    assert helm.helm_sdk_version().startswith("v4.")


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_chart_renders(chart, value_set):
    docs = render(chart, load_values(value_set))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Job", "PodDisruptionBudget", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_helm_lint_strict_is_clean(value_set):
    report = helm.lint(CHART, load_values(value_set), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; --strict fails on either. Info (1) is allowed.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_manifest_validates_against_kubernetes(chart, value_set):
    docs = render(chart, load_values(value_set))
    assert docs
    for doc in docs:
        # strict: unknown fields are errors too.
        kubernetes_validate.validate(strip(doc), KUBE_VERSION, strict=True)


def test_validation_can_fail():
    """The validator really rejects a broken manifest (guards against a vacuous pass)."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {"spec": {"containers": [{"name": "c", "image": "i", "prots": []}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_schema_closes_every_object():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"{path or '<root>'} lacks additionalProperties: false"
            for key, child in node.items():
                walk(child, f"{path}.{key}" if path else key)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}[{i}]")

    assert schema["additionalProperties"] is False
    walk(schema, "")


def test_schema_accepts_the_defaults(chart):
    chart.validate_schema(chart.values)
    chart.validate_schema({})


def test_values_file_with_typo_is_rejected(chart):
    values = yaml.safe_load((VALUES_DIR / "typo.yaml").read_text())
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert "replicas" in str(err.value) or "enabeld" in str(err.value)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


@pytest.mark.parametrize("bad", [
    {"api": {"replicaCount": "three"}},
    {"config": {"maxUploadBytes": -1}},
    {"config": {"jobTimeLimitS": 30}},
    {"config": {"staleUploadAfterS": 59}},
    {"config": {"storageSweepIntervalS": 0}},
    {"config": {"directUploadPartBytes": 1048576}},
    {"config": {"directUploadPartBytes": 6442450944}},
    {"config": {"callbackAllowPrivate": "yes"}},
    {"workers": {"gpu": {"queues": ["gpus"]}}},
    {"s3": {"artifactUri": "bucket/prefix"}},
    {"imageTag": "1.0"},
])
def test_schema_rejects_bad_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


# --------------------------------------------------------------------------
# chart: behaviour
# --------------------------------------------------------------------------

def worker(docs, pool: str) -> dict[str, Any]:
    return one(docs, "Deployment", f"{RELEASE}-rebasin-worker-{pool}")


def test_gpu_worker_requests_gpus_in_limits(chart):
    docs = render(chart, load_values("gpu"))
    dep = worker(docs, "gpu")
    spec = dep["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert dep["spec"]["replicas"] == 4
    assert spec["nodeSelector"]
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in spec["tolerations"])
    args = container["args"]
    assert args[0] == "worker"
    assert args[args.index("--queues") + 1] == "default,gpu"
    assert args[args.index("--device") + 1] == "cuda:0"
    assert args[args.index("--concurrency") + 1] == "1"
    assert container["image"].endswith("-cuda")
    # maxSurge 0: a rollout never asks for more GPUs than the pool has.
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    # The CPU pool is off in this values file.
    assert not [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("worker-cpu")]
    one(docs, "PodDisruptionBudget", f"{RELEASE}-rebasin-worker-gpu")


def test_no_gpu_requested_without_gpu_pool(chart):
    docs = render(chart, None)
    for name, spec in pod_specs(docs):
        for c in spec["containers"]:
            limits = c.get("resources", {}).get("limits", {})
            assert not any("gpu" in k for k in limits), name
    cpu = worker(docs, "cpu")["spec"]["template"]["spec"]["containers"][0]
    assert cpu["args"][cpu["args"].index("--queues") + 1] == "default,cpu"
    assert cpu["args"][cpu["args"].index("--device") + 1] == "cpu"
    assert cpu["image"].endswith("-cpu")


def test_gpu_resource_name_is_configurable(chart):
    docs = render(chart, {"workers": {"gpu": {"enabled": True, "gpuResourceName": "nvidia.com/mig-1g.10gb"}}})
    limits = worker(docs, "gpu")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/mig-1g.10gb"]) == "1"
    assert "nvidia.com/gpu" not in limits


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_all_pods_run_as_non_root(chart, value_set):
    docs = render(chart, load_values(value_set))
    specs = pod_specs(docs)
    assert len(specs) >= 3
    for name, spec in specs:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 0) != 0, name
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", True) is not False, name
            assert sc.get("runAsUser", psc.get("runAsUser")) != 0, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("privileged", False) is False, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), name
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be an emptyDir"
            data_dir = container_env(docs, c).get("REBASIN_DATA_DIR", {}).get("value")
            assert data_dir in mounts, f"{name}: the data dir {data_dir} must be writable"


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_api_probes_hit_the_health_endpoints(chart, value_set):
    docs = render(chart, load_values(value_set))
    api = one(docs, "Deployment", f"{RELEASE}-rebasin-api")
    (c,) = api["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8000

    def target(probe):
        port = probe["httpGet"]["port"]
        return probe["httpGet"]["path"], ports.get(port, port)

    assert target(c["livenessProbe"]) == ("/healthz", 8000)
    assert target(c["readinessProbe"]) == ("/readyz", 8000)
    assert target(c["startupProbe"]) == ("/healthz", 8000)
    assert c["args"][:1] == ["serve"]
    assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
    assert c["args"][c["args"].index("--port") + 1] == "8000"
    # Binding 0.0.0.0 requires API keys: the API must get them.
    assert "secretKeyRef" in container_env(docs, c)["REBASIN_API_KEYS"]["valueFrom"]
    svc = one(docs, "Service", f"{RELEASE}-rebasin-api")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    sel = svc["spec"]["selector"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert sel.items() <= labels.items()
    # The Service must not also select worker or migration pods.
    for d in docs:
        if d["kind"] in {"Deployment", "Job"} and d is not api:
            assert not sel.items() <= d["spec"]["template"]["metadata"]["labels"].items(), d["metadata"]["name"]


def test_ingress_and_autoscaling(chart):
    docs = render(chart, load_values("ingress-autoscaling"))
    ing = one(docs, "Ingress", f"{RELEASE}-rebasin-api")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"][0]["secretName"] == "rebasin-tls"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == f"{RELEASE}-rebasin-api"
    hpa = one(docs, "HorizontalPodAutoscaler", f"{RELEASE}-rebasin-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-rebasin-api"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    # The HPA owns the replica count.
    assert "replicas" not in one(docs, "Deployment", f"{RELEASE}-rebasin-api")["spec"]
    # Default: neither.
    default = render(chart, None)
    assert not by_kind(default, "Ingress") and not by_kind(default, "HorizontalPodAutoscaler")


def test_pod_disruption_budgets(chart):
    docs = render(chart, load_values("full"))
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name} must be covered by exactly one PDB"


def test_migrations_run_as_pre_install_and_pre_upgrade_hook(chart):
    docs = render(chart, None)
    job = one(docs, "Job", f"{RELEASE}-rebasin-migrations")
    ann = job["metadata"]["annotations"]
    assert set(ann["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "before-hook-creation" in ann["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (c,) = spec["containers"]
    assert c["args"] == ["db", "upgrade"]
    # A pre-install hook runs before the release's own objects exist: it must not
    # depend on the chart's ConfigMap or ServiceAccount.
    assert "envFrom" not in c
    assert "serviceAccountName" not in spec
    env = {e["name"]: e for e in c["env"]}
    assert env["REBASIN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-rebasin-database"
    # Least privilege: migrations need the database, not the API keys.
    assert "REBASIN_API_KEYS" not in env
    assert not by_kind(render(chart, {"migrations": {"enabled": False}}), "Job")


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_no_credentials_in_plain_text(chart, value_set):
    docs = render(chart, load_values(value_set))
    # The chart never creates Secrets: credentials come from existing ones.
    assert not by_kind(docs, "Secret")
    for cm in by_kind(docs, "ConfigMap"):
        assert not SECRET_VARS & set(cm.get("data", {})), cm["metadata"]["name"]
    for name, spec in pod_specs(docs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if e["name"] in SECRET_VARS:
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{name}: {e['name']}"


def test_existing_secret_names_are_used(chart):
    docs = render(chart, load_values("full"))
    api = one(docs, "Deployment", f"{RELEASE}-rebasin-api")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in api["env"] if "valueFrom" in e}
    assert refs["REBASIN_DATABASE_URL"] == {"name": "pg-credentials", "key": "url"}
    assert refs["REBASIN_BROKER_URL"] == {"name": "redis-credentials", "key": "url"}
    assert refs["REBASIN_API_KEYS"] == {"name": "rebasin-api-keys", "key": "keys"}
    assert refs["AWS_ACCESS_KEY_ID"] == {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    assert refs["REBASIN_CALLBACK_SECRET"] == {"name": "rebasin-callbacks", "key": "hmac"}
    # The callback secret is optional: without callbacks.existingSecret it is not set at all.
    for _, spec in pod_specs(render(chart, None)):
        for c in spec["containers"]:
            assert "REBASIN_CALLBACK_SECRET" not in {e["name"] for e in c.get("env", [])}
    # IRSA / workload identity: no static S3 credentials at all.
    docs = render(chart, {"s3": {"staticCredentials": False}})
    for _, spec in pod_specs(docs):
        for c in spec["containers"]:
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in c.get("env", [])}


def test_settings_changes_roll_the_pods(chart):
    a = render(chart, None)
    b = render(chart, {"config": {"jobMaxAttempts": 5}})
    name = f"{RELEASE}-rebasin-api"
    ann = lambda docs: one(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert ann(a) != ann(b)


# --------------------------------------------------------------------------
# settings: documented and settable
# --------------------------------------------------------------------------

def docs_reference_rows() -> dict[str, list[str]]:
    """The configuration reference table of docs/deploy.md: variable -> cells."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = re.match(r"^\|\s*`((?:REBASIN|AWS)_[A-Z0-9_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [cell.strip() for cell in m.group(2).split("|")]
    return rows


def test_settings_are_read_from_the_real_class():
    env = settings_env_vars()
    # Sanity: the fields this chart was written against are there.
    assert {"REBASIN_DATABASE_URL", "REBASIN_BROKER_URL", "REBASIN_API_KEYS", "REBASIN_ARTIFACT_URI"} <= set(env)


@pytest.mark.parametrize("var", sorted(settings_env_vars()) + AWS_VARS)
def test_every_setting_is_documented_with_its_default(var):
    rows = docs_reference_rows()
    assert var in rows, f"{var} is read by core.config.Settings but not documented in docs/deploy.md's reference table"
    default_cell, chart_cell = rows[var][0], rows[var][1]
    field = settings_env_vars().get(var)
    if field is not None:
        default = field.get_default(call_default_factory=True)
        if default is None:
            assert default_cell.lower().startswith("unset"), f"{var}: default is unset, docs say {default_cell!r}"
        else:
            code = re.findall(r"`([^`]*)`", default_cell)
            assert code, f"{var}: docs give no `default`"
            expected = str(default.value if hasattr(default, "value") else default)
            if isinstance(default, bool):
                expected = expected.lower()
            documented = code[0].strip('"') if code[0] in ('""', "''") else code[0]
            if isinstance(default, str) and default == "":
                assert code[0] in ('""', "''", ""), f"{var}: default is empty, docs say {code[0]!r}"
            else:
                assert documented == expected, f"{var}: default is {expected!r}, docs say {documented!r}"
    # The chart column names a real values path.
    paths = re.findall(r"`([A-Za-z0-9_.]+)`", chart_cell)
    assert paths, f"{var}: docs name no chart value"
    values = helm.Chart.load(CHART).values
    for path in paths:
        node: Any = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{var}: chart value {path} does not exist"
            node = node[part]


def test_every_setting_is_settable_from_the_chart(chart):
    docs = render(chart, load_values("full"))
    api = one(docs, "Deployment", f"{RELEASE}-rebasin-api")["spec"]["template"]["spec"]["containers"][0]
    gpu = worker(docs, "gpu")["spec"]["template"]["spec"]["containers"][0]
    api_env, worker_env = container_env(docs, api), container_env(docs, gpu)
    missing = [v for v in list(settings_env_vars()) + AWS_VARS if v not in api_env and v not in worker_env]
    assert not missing, f"not settable from the chart: {missing}"
    # Values reach the pods as given.
    expect = {
        "REBASIN_DATA_DIR": "/scratch/rebasin",
        "REBASIN_MAX_UPLOAD_BYTES": "1234567",
        "REBASIN_ARCHIVE_MAX_MEMBERS": "500",
        "REBASIN_STALE_UPLOAD_AFTER_S": "43200",
        "REBASIN_STORAGE_SWEEP_INTERVAL_S": "900",
        "REBASIN_DIRECT_UPLOAD_PART_BYTES": "16777216",
        "REBASIN_JOB_MAX_ATTEMPTS": "7",
        "REBASIN_WORKER_DEVICE": "cuda:1",
        "REBASIN_JOB_TIME_LIMIT_S": "7200",
        "REBASIN_JOB_HEARTBEAT_TIMEOUT_S": "45.5",
        "REBASIN_WORKER_MEMORY_BYTES": "34359738368",
        "REBASIN_WORKER_MAX_MEMORY_PER_CHILD_MB": "30000",
        "REBASIN_CALLBACK_ALLOW_PRIVATE": "true",
        "REBASIN_AUTH_CACHE_S": "2.5",
        "REBASIN_SESSION_MAX_S": "28800",
        "REBASIN_AUDIT_RETENTION_DAYS": "365",
        "REBASIN_OIDC_ISSUER": "https://login.example.com/realms/ml",
        "REBASIN_OIDC_AUDIENCE": "rebasin-prod",
        "REBASIN_ARTIFACT_URI": "s3://my-bucket/prefix",
        "REBASIN_S3_ENDPOINT_URL": "https://minio.storage.svc:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    for var, value in expect.items():
        assert api_env[var] == {"value": value}, var
        assert worker_env[var] == {"value": value}, var
    # Workers share everything but the API keys and their pepper.
    assert set(worker_env) == set(api_env) - {"REBASIN_API_KEYS", "REBASIN_KEY_PEPPER"}
    assert api_env["REBASIN_KEY_PEPPER"]["valueFrom"]["secretKeyRef"] == {"name": "rebasin-key-pepper", "key": "pepper"}
    # And the values parse with the real Settings class.
    plain = {k: v["value"] for k, v in api_env.items() if "value" in v}
    plain.update({"REBASIN_DATABASE_URL": "postgresql+psycopg://u:p@db/rebasin",
                  "REBASIN_BROKER_URL": "redis://redis:6379/0", "REBASIN_API_KEYS": "t:k",
                  "REBASIN_CALLBACK_SECRET": "s", "REBASIN_KEY_PEPPER": "p"})
    Settings(**{k[len("REBASIN_"):].lower(): v for k, v in plain.items() if k.startswith("REBASIN_")})


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def expand_args(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return False
    tag = name.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


def test_dockerfile_rules():
    instr = dockerfile_instructions(DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for word, rest in instr:
        if word == "ARG" and "=" in rest and not stages:
            key, _, val = rest.partition("=")
            args[key] = val
        elif word == "FROM":
            parts = rest.split()
            image = expand_args(parts[0], args)
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": image, "alias": alias, "instr": []})
        elif stages:
            stages[-1]["instr"].append((word, rest))

    assert len(stages) >= 2, "multi-stage build expected"
    aliases = {s["alias"] for s in stages}
    for s in stages:
        if s["image"] not in aliases:
            assert image_is_pinned(s["image"]), f"unpinned base image {s['image']}"
    final = stages[-1]
    final_words = [w for w, _ in final["instr"]]
    # Non-root: the last USER of the final stage is a numeric non-zero uid.
    users = [r for w, r in final["instr"] if w == "USER"]
    assert users, "final stage has no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} must be a numeric non-root uid"
    # HEALTHCHECK with python, not curl.
    hc = [r for w, r in instr if w == "HEALTHCHECK"]
    assert hc and "NONE" not in hc[-1].upper()
    assert "python" in hc[-1] and "curl" not in hc[-1] and "/healthz" in hc[-1]
    # The final stage copies the built environment and compiles nothing.
    assert any(w == "COPY" and "--from=" in r for w, r in final["instr"])
    final_text = " ".join(r for _, r in final["instr"])
    for tool in ["gcc", "g++", "build-essential", "make ", "clang", "cargo", "pip install"]:
        assert tool not in final_text, f"final stage must not install {tool.strip()}"
    # One image for every role.
    entry = [r for w, r in final["instr"] if w == "ENTRYPOINT"][-1]
    assert json.loads(entry) == ["rebasin"]
    cmd = json.loads([r for w, r in final["instr"] if w == "CMD"][-1])
    assert cmd[0] == "serve" and "0.0.0.0" in cmd
    assert "EXPOSE" in final_words
    # A build argument selects the CPU or CUDA PyTorch wheels; CPU by default.
    builder_text = " ".join(r for s in stages[:-1] for _, r in s["instr"])
    assert "TORCH_VARIANT=cpu" in builder_text
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in builder_text
    torch_install = [r for s in stages[:-1] for w, r in s["instr"] if w == "RUN" and "torch==" in r]
    assert torch_install and "--index-url" in torch_install[0]
    # torch is installed before the application.
    runs = [r for s in stages[:-1] for w, r in s["instr"] if w == "RUN" and "pip install" in r]
    assert "torch==" in runs[0] and any("pip install /src" in r or "pip install ." in r for r in runs[1:])
    # Writable paths point outside the read-only root filesystem.
    env_text = " ".join(r for w, r in final["instr"] if w == "ENV")
    assert "REBASIN_DATA_DIR=/var/lib/rebasin" in env_text and "MPLCONFIGDIR=/tmp" in env_text


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for must in [".git", ".venv", ".env", "tests", "helm", "**/__pycache__"]:
        assert must in ignored, must
    # Never ignore what `pip install .` needs.
    for needed in ["pyproject.toml", "api", "worker", "matching", "storage", "README.md"]:
        assert needed not in ignored, needed


# --------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------

def compose_image(image: str) -> str:
    """Expand ${VAR:-default} with its default, as compose does when VAR is unset."""
    return re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), image)


def test_compose_file_rules():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name in ["postgres", "redis", "minio", "create-bucket", "migrate", "api", "worker"]:
        assert name in services, name
    for name, svc in services.items():
        assert "image" in svc, f"{name}: every service names an image"
        assert image_is_pinned(compose_image(svc["image"])), f"{name}: {svc['image']} is not pinned"
    assert compose_image(services["minio"]["image"]).startswith("minio/minio:RELEASE.")

    ours = {n: s for n, s in services.items() if "build" in s}
    assert {"migrate", "api", "worker"} <= set(ours)
    for name, svc in ours.items():
        uid = str(svc.get("user", "0")).split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: must run as a non-root user"
        assert svc.get("read_only") is True, name
        env = svc["environment"]
        assert env["REBASIN_BROKER_URL"].startswith("redis://redis:")
        assert env["REBASIN_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["REBASIN_ARTIFACT_URI"].startswith("s3://")
        assert env["REBASIN_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]

    api = services["api"]
    assert api["command"][0] == "serve" and "0.0.0.0" in api["command"]
    assert api["environment"]["REBASIN_API_KEYS"], "binding 0.0.0.0 needs API keys"
    assert "/healthz" in " ".join(api["healthcheck"]["test"]) or "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["command"][0] == "worker"
    assert services["worker"]["healthcheck"] == {"disable": True}
    # The bucket exists before the API or a worker writes to it.
    bucket = re.search(r"s3://([^/]+)", api["environment"]["REBASIN_ARTIFACT_URI"]).group(1)
    assert f"local/{bucket}" in " ".join(services["create-bucket"]["command"])
    for name in ["api", "worker"]:
        assert services[name]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    gpu = services.get("worker-gpu")
    if gpu is not None:
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert "--device" in gpu["command"] and "cuda:0" in gpu["command"]
    # Listen on loopback only: a laptop stack must not be exposed.
    for svc in services.values():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_docs_cover_the_operations_topics():
    text = DOCS.read_text()
    for topic in ["MinIO", "Ceph", "R2", "AWS", "GPU", "migration", "backup", "TLS", "API key",
                  "REBASIN_MAX_UPLOAD_BYTES", "existingSecret", "helm upgrade", "docker compose"]:
        assert topic.lower() in text.lower(), topic


def test_docs_show_the_install_command():
    cmd = re.search(r"```bash\n(helm upgrade --install[^\n]*(?:\\\n[^\n]*)*)", DOCS.read_text())
    assert cmd, "docs/deploy.md shows the helm upgrade --install command"
    words = shlex.split(cmd.group(1).replace("\\\n", " "))
    assert words[:3] == ["helm", "upgrade", "--install"]
