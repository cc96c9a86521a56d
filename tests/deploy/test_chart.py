"""test_chart.py - helm/entrokv with real tools: `helm lint` and `helm
template` (Helm's Go SDK through helm-python-sdk) with the defaults and every
example values file; every rendered object against the Kubernetes API
schemas (kubernetes-validate, strict: unknown fields are errors) and the
LeaderWorkerSet against its CRD's schema (jsonschema); references between
objects; checkov on the manifests and the Dockerfiles; bad values refused by
values.schema.json with a message that names the key.
"""
import base64
import json
import os
import re
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from chart import CHART, EXAMPLES, NAMESPACE, ROOT, example_values, find, merge, objects, pod_specs, render

CASES = ["default"] + EXAMPLES
KUBE = "1.30.0"  # the oldest schema set at or above Chart.yaml's kubeVersion floor we test against
HERE = os.path.dirname(__file__)
CHECKOV = os.environ.get("EKV_CHECKOV", os.path.join(ROOT, ".venv", "checkov", "bin", "checkov"))


def test_examples_are_there():
    assert {"cpu-small", "gpu-tp8", "multinode-kvstore"} <= set(EXAMPLES)


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict(case):
    report = helm.lint(CHART, example_values(case), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert bad == [], bad


def k8s_definitions_registry(version=KUBE):
    """kubernetes-validate's definitions, under the URI its own schemas use."""
    from kubernetes_validate import utils

    ver = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)][-1]
    defs = utils.schema_contents(f"kubernetes-json-schema/v{ver}-local-strict/_definitions.json", version)
    return Registry().with_resource("/api/_definitions.json",
                                    Resource.from_contents(defs, default_specification=DRAFT202012))


def validate_lws(obj):
    with open(os.path.join(HERE, "leaderworkerset-v1.schema.json")) as f:
        schema = json.load(f)
    assert obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    jsonschema.Draft202012Validator(schema, registry=k8s_definitions_registry()).validate(obj)


@pytest.mark.parametrize("case", CASES)
def test_every_object_validates(case):
    objs = objects(example_values(case))
    kinds = set()
    for o in objs:
        kinds.add(o["kind"])
        where = f"{o['kind']}/{o['metadata']['name']}"
        assert o["metadata"].get("namespace") == NAMESPACE, where
        if o["kind"] == "LeaderWorkerSet":
            validate_lws(o)
        elif o["kind"] == "ServiceMonitor":
            # a Prometheus Operator CRD: no schema ships; its port must exist
            svc_ports = {p["name"] for s in objs if s["kind"] == "Service" for p in s["spec"]["ports"]}
            assert {e["port"] for e in o["spec"]["endpoints"]} <= svc_ports, where
        else:
            try:
                kubernetes_validate.validate(o, KUBE, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy"} <= kinds


def test_lws_schema_is_strict():
    """The LWS check can fail: a misspelt field and a bad enum are refused."""
    lws = find(objects(example_values("multinode-kvstore")), "LeaderWorkerSet")
    validate_lws(lws)
    bad = json.loads(json.dumps(lws))
    bad["spec"]["leaderWorkerTemplate"]["sise"] = 2
    with pytest.raises(jsonschema.ValidationError, match="sise"):
        validate_lws(bad)
    bad = json.loads(json.dumps(lws))
    bad["spec"]["startupPolicy"] = "WhenReady"
    with pytest.raises(jsonschema.ValidationError, match="WhenReady"):
        validate_lws(bad)
    bad = json.loads(json.dumps(lws))
    bad["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["imagePolicy"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="imagePolicy"):
        validate_lws(bad)


@pytest.mark.parametrize("case", CASES)
def test_references_between_objects_hold(case):
    """What schemas cannot see: every ConfigMap, Secret and claim a pod mounts
    exists (or is named as external in the values), every Service selects
    pods that expose its target ports, probes name real ports."""
    values = merge(helm.Chart.load(CHART).values, example_values(case))
    objs = objects(example_values(case))
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    external = {("Secret", values["kvstore"]["token"]["existingSecret"]),
                ("Secret", values["workers"]["lws"].get("sshSecret", "")),
                ("PersistentVolumeClaim", values["model"]["pvc"]["claimName"])}
    pods = pod_specs(objs)
    assert pods
    for owner, tpl in pods:
        spec = tpl["spec"]
        assert spec.get("enableServiceLinks") is False, owner  # no ENTROKV_PORT & co. from Services
        for vol in spec.get("volumes", []):
            for kind, key, field in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName"),
                                     ("PersistentVolumeClaim", "persistentVolumeClaim", "claimName")):
                if key in vol:
                    ref = (kind, vol[key][field])
                    assert ref in names or ref in external, f"{owner} mounts missing {ref}"
        vol_names = {v["name"] for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= vol_names, owner
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = c.get(probe)
                if not p:
                    continue
                port = (p.get("httpGet") or p.get("grpc") or p.get("tcpSocket"))["port"]
                assert port in ports or port in ports.values(), f"{owner} {probe} port {port}"
    for svc in (o for o in objs if o["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        matching = [t for _, t in pods if sel.items() <= t["metadata"]["labels"].items()]
        if "leaderworkerset.sigs.k8s.io/worker-index" in sel:  # set on pods by the LWS controller
            s2 = {k: v for k, v in sel.items() if not k.startswith("leaderworkerset.sigs.k8s.io/")}
            matching = [t for o2, t in pods if o2.endswith("-leader") and s2.items() <= t["metadata"]["labels"].items()]
        assert matching, f"Service {svc['metadata']['name']} selects no pod"
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            assert any(tp in {q["name"] for c in t["spec"]["containers"] for q in c.get("ports", [])} |
                       {q["containerPort"] for c in t["spec"]["containers"] for q in c.get("ports", [])}
                       for t in matching), f"Service {svc['metadata']['name']} port {tp}"


def test_coordinator_discovers_the_headless_worker_service():
    objs = objects(example_values("cpu-small"))
    args = find(objs, "Deployment", "-coordinator")["spec"]["template"]["spec"]["containers"][0]["args"]
    svc = find(objs, "Service", "-worker")
    assert svc["spec"]["clusterIP"] == "None"
    i = args.index("--workers")
    assert args[i + 1] == f"dns:{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def test_kvstore_token_from_values_or_generated():
    vals = example_values("cpu-small")
    sec = find(objects(vals), "Secret", "-kvstore-token")
    token = base64.b64decode(sec["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token)  # no cluster to look up: a fresh one
    sec = find(objects(merge(vals, {"kvstore": {"token": {"value": "s3cret-token"}}})), "Secret", "-kvstore-token")
    assert base64.b64decode(sec["data"]["token"]).decode() == "s3cret-token"
    objs = objects(merge(vals, {"kvstore": {"token": {"existingSecret": "mine"}}}))
    assert not [o for o in objs if o["kind"] == "Secret"]
    ds = find(objs, "DaemonSet", "-kvstore")
    assert {"name": "kvstore-token", "secret": {"secretName": "mine", "defaultMode": 0o440,
            "items": [{"key": "token", "path": "kvstore-token"}]}} in ds["spec"]["template"]["spec"]["volumes"]


@pytest.mark.parametrize("source", ["pvc", "hostPath", "fetch"])
def test_model_sources(source):
    objs = objects({"model": {"source": source, "pvc": {"create": True}}})
    spec = find(objs, "StatefulSet", "-worker")["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v["name"] == "model")
    key = {"pvc": "persistentVolumeClaim", "hostPath": "hostPath", "fetch": "emptyDir"}[source]
    assert key in vol
    inits = [c["args"] for c in spec.get("initContainers", [])]
    assert inits == ([["fetch-model", "--dir", "/models"]] if source == "fetch" else [])
    assert bool([o for o in objs if o["kind"] == "PersistentVolumeClaim"]) == (source == "pvc")


def test_gpu_workers_request_their_tensor_parallel_devices():
    objs = objects(example_values("gpu-tp8"))
    c = find(objs, "StatefulSet", "-worker")["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert find(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 6
    assert "replicas" not in find(objs, "Deployment", "-coordinator")["spec"]  # the HPA owns it


@pytest.mark.parametrize("case", CASES)
def test_security_context_everywhere(case):
    for owner, tpl in pod_specs(objects(example_values(case))):
        assert tpl["spec"]["securityContext"]["runAsNonRoot"] is True, owner
        for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, owner
            assert sc["capabilities"]["drop"] == ["ALL"], owner
            assert c["resources"]["limits"] and c["resources"]["requests"], owner


def coordinator_pod(objs):
    return find(objs, "Deployment", "-coordinator")["spec"]["template"]["spec"]


def test_coordinator_tls_and_api_key_from_secrets():
    """coordinator.tls.secret and coordinator.apiKey.secret: the Secrets
    mounted read-only, the flags (docs/serving.md, "Security") pointing at
    the mounted files, the probes and the metrics scrape over HTTPS; every
    object still valid. Without them: none of it."""
    plain = coordinator_pod(objects(example_values("cpu-small")))
    args = plain["containers"][0]["args"]
    assert not {"--tls-cert", "--tls-key", "--api-key", "--api-key-file"} & set(args)
    assert {p["name"] for p in plain["containers"][0]["ports"]} == {"grpc", "http"}
    assert not [v for v in plain["volumes"] if "secret" in v]

    vals = merge(example_values("cpu-small"), {
        "coordinator": {"tls": {"secret": "front-tls"}, "apiKey": {"secret": "front-key", "key": "k"}},
        "serviceMonitor": {"enabled": True}})
    report = helm.lint(CHART, vals, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    objs = objects(vals)
    for o in objs:
        if o["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(o, KUBE, strict=True)
    spec = coordinator_pod(objs)
    c = spec["containers"][0]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}

    def secret_file(flag, secret, key):
        """The file flag names lies in a read-only mount of key of secret."""
        path = c["args"][c["args"].index(flag) + 1]
        m = next(m for m in mounts.values() if path.startswith(m["mountPath"].rstrip("/") + "/"))
        assert m["readOnly"] is True, m
        s = vols[m["name"]]["secret"]
        assert s["secretName"] == secret, s
        rel = path[len(m["mountPath"].rstrip("/")) + 1:]
        assert {"key": key, "path": rel} in s["items"], (s, rel)
        assert s["defaultMode"] & 0o007 == 0, s  # not world-readable

    secret_file("--tls-cert", "front-tls", "tls.crt")
    secret_file("--tls-key", "front-tls", "tls.key")
    secret_file("--api-key-file", "front-key", "k")
    assert "--api-key" not in c["args"]  # never the key itself in the process list
    # the probes speak HTTPS to the HTTP port, now named https
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["https"] == vals["coordinator"].get("httpPort", 8080) and "http" not in ports
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        g = c[probe]["httpGet"]
        assert g["scheme"] == "HTTPS" and g["port"] == "https", (probe, g)
    svc = find(objs, "Service", "demo-entrokv")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["grpc", "https"]
    assert find(objs, "Service", "demo-entrokv")["spec"]["ports"][1]["targetPort"] == "https"
    ends = find(objs, "ServiceMonitor")["spec"]["endpoints"]
    https = [e for e in ends if e["port"] == "https"]
    assert len(https) == 1 and https[0]["scheme"] == "https" and https[0]["path"] == "/metrics"
    assert [e["port"] for e in ends if e["port"] == "http"] == ["http"]  # the KV store's, still plain


def test_network_policies_limit_who_reaches_whom():
    objs = objects(example_values("cpu-small"))
    pol = {o["metadata"]["name"].rsplit("-", 1)[1]: o for o in objs if o["kind"] == "NetworkPolicy"}
    assert set(pol) == {"coordinator", "worker", "kvstore"}
    wk = pol["worker"]["spec"]["ingress"]
    assert wk[0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "coordinator"
    assert [p["port"] for p in wk[0]["ports"]] == [50061]
    # the only other rule: the KV store daemons (UCX connects from both ends)
    assert [r["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in wk[1:]] == ["kvstore"]
    kv = pol["kvstore"]["spec"]["ingress"][0]["from"]
    assert kv[0]["podSelector"]["matchExpressions"][0]["values"] == ["worker", "worker-rank"]


BAD_VALUES = [
    ({"workers": {"replicas": -1}}, "/workers/replicas", "minimum"),
    ({"coordinator": {"replicas": -2}}, "/coordinator/replicas", "minimum"),
    ({"serving": {"kv": {"method": "zip"}}}, "/serving/kv/method", "one of"),
    ({"workers": {"mode": "deployment"}}, "/workers/mode", "one of"),
    ({"model": {"source": "s3"}}, "/model/source", "one of"),
    ({"workers": {"tensorParallel": 0}}, "/workers/tensorParallel", "minimum"),
    ({"coordinator": {"grpcPort": 70000}}, "/coordinator/grpcPort", "maximum"),
    ({"kvstore": {"peers": ["no-port"]}}, "/kvstore/peers/0", "pattern"),
    ({"workrs": {"replicas": 1}}, "'workrs' not allowed", ""),
    ({"coordinator": {"tls": {"secret": "Not_A_Name"}}}, "/coordinator/tls/secret", "pattern"),
    ({"coordinator": {"apiKey": {"key": "a/b"}}}, "/coordinator/apiKey/key", "pattern"),
]


@pytest.mark.parametrize("bad,where,what", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_values_fail_with_a_clear_message(bad, where, what):
    with pytest.raises(helm.HelmValuesError) as e:
        render(bad)
    assert where in str(e.value) and what in str(e.value), str(e.value)
    report = helm.lint(CHART, bad, strict=True)
    assert any(where in m["error"] for m in report["messages"] if m["severity"] == 3), report


def test_leaderworkerset_needs_its_ssh_secret():
    with pytest.raises(helm.HelmRenderError, match="workers.lws.sshSecret"):
        render({"workers": {"mode": "leaderworkerset"}})


def test_leaderworkerset_launches_a_tensor_parallel_worker():
    """The leader starts the group through deploy/mpi/run.sh (in the image as
    entrokv-mpi-run: --enable-recovery, --oversubscribe, ...) as one
    `entrokv worker --tp SIZE` of the group's pods, not a bare mpirun of
    independent workers (docs/tp.md, "A worker group")."""
    lws = find(objects(example_values("multinode-kvstore")), "LeaderWorkerSet")
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    script = leader["args"][0]
    launch = script[script.index("exec "):]
    assert launch.startswith("exec entrokv-mpi-run -np \"$LWS_GROUP_SIZE\" --hosts \"$hosts\""), launch
    assert re.search(r" -- entrokv worker .*--tp \"\$LWS_GROUP_SIZE\"\s*$", launch, re.S), launch
    assert "mpirun" not in launch
    with open(os.path.join(ROOT, "deploy", "Dockerfile.cuda")) as f:  # the image has it
        assert "COPY deploy/mpi/run.sh /usr/local/bin/entrokv-mpi-run" in f.read()


def checkov(path, frameworks):
    if not os.access(CHECKOV, os.X_OK):
        pytest.fail(f"no checkov at {CHECKOV} (scripts/setup.sh installs it)")
    r = subprocess.run([CHECKOV, "-d", path, "--framework", frameworks, "-o", "json",
                        "--skip-download", "--no-fail-on-crash"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    assert r.stdout.strip(), r.stderr[-3000:]
    reports = json.loads(r.stdout)
    return reports if isinstance(reports, list) else [reports]


def test_checkov_finds_nothing_unexplained():
    """Every failed check is fixed; every accepted one is skipped in the chart
    (checkov.io/skipN annotations) or the Dockerfile with its reason."""
    with tempfile.TemporaryDirectory(prefix="ekv-checkov-") as d:
        for case in CASES:
            os.makedirs(os.path.join(d, case))
            objs = objects(example_values(case))
            # the LeaderWorkerSet's pods, as the pods they become (checkov knows no CRD)
            for o in objs:
                if o["kind"] == "LeaderWorkerSet":
                    for suffix, key in (("leader", "leaderTemplate"), ("rank", "workerTemplate")):
                        t = o["spec"]["leaderWorkerTemplate"][key]
                        objs.append({"apiVersion": "v1", "kind": "Pod",
                                     "metadata": {**t["metadata"], "name": f"{o['metadata']['name']}-{suffix}",
                                                  "namespace": NAMESPACE,
                                                  "annotations": o["metadata"].get("annotations", {})},
                                     "spec": t["spec"]})
            for i, o in enumerate(objs):
                with open(os.path.join(d, case, f"{i:02d}-{o['kind']}.yaml"), "w") as f:
                    yaml.safe_dump(o, f)
        reports = checkov(d, "kubernetes")
        with tempfile.TemporaryDirectory(prefix="ekv-checkov-docker-") as d2:
            for name in os.listdir(os.path.join(ROOT, "deploy")):
                if name.startswith("Dockerfile"):
                    with open(os.path.join(ROOT, "deploy", name)) as src, open(os.path.join(d2, name), "w") as dst:
                        dst.write(src.read())
            reports += checkov(d2, "dockerfile")
    types = {r["check_type"] for r in reports}
    assert types == {"kubernetes", "dockerfile"}, types
    for r in reports:
        assert r["summary"]["parsing_errors"] == 0, r["summary"]
        assert r["summary"]["resource_count"] > 0, r["summary"]
        failed = [(f["check_id"], f["check_name"], f["resource"]) for f in r["results"]["failed_checks"]]
        assert failed == [], failed
        for s in r["results"]["skipped_checks"]:
            reason = s["check_result"].get("suppress_comment") or ""
            assert len(reason) > 20, f"skip without a reason: {s['check_id']} {s['resource']}"


def test_hadolint_passes_the_dockerfiles():
    """hadolint at its strictest threshold (info); each ignore in a
    Dockerfile carries its reason on the line above."""
    hadolint = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "hadolint")
    files = sorted(os.path.join(ROOT, "deploy", f) for f in os.listdir(os.path.join(ROOT, "deploy"))
                   if f.startswith("Dockerfile") and not f.endswith(".dockerignore"))
    assert len(files) == 2, files
    r = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", *files],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in files:
        with open(f) as fh:
            lines = fh.read().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore" in line:
                assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], f"{f}:{i + 1}"


def test_checkov_catches_a_weakened_security_context():
    """The scan above can fail: the same chart with a writable root and
    privilege escalation allowed is flagged."""
    weak = merge(example_values("cpu-small"), {"securityContext": {
        "allowPrivilegeEscalation": True, "readOnlyRootFilesystem": False, "privileged": False,
        "capabilities": {"drop": ["ALL"]}}})
    with tempfile.TemporaryDirectory(prefix="ekv-checkov-weak-") as d:
        for i, o in enumerate(objects(weak)):
            with open(os.path.join(d, f"{i:02d}.yaml"), "w") as f:
                yaml.safe_dump(o, f)
        reports = checkov(d, "kubernetes")
    failed = {f["check_id"] for r in reports for f in r["results"]["failed_checks"]}
    assert {"CKV_K8S_20", "CKV_K8S_22"} <= failed, failed


@pytest.mark.parametrize("case", CASES)
def test_kubernetes_waits_longer_than_the_drain(case):
    """SIGKILL must not land before the binary's own drain timeout (counted
    from SIGTERM) has let running streams finish or cancelled them."""
    values = merge(helm.Chart.load(CHART).values, example_values(case))
    for owner, tpl in pod_specs(objects(example_values(case))):
        env = {e["name"]: e.get("value") for c in tpl["spec"]["containers"] for e in c.get("env", [])}
        if "ENTROKV_DRAIN_TIMEOUT" not in env:
            continue
        assert float(env["ENTROKV_DRAIN_TIMEOUT"]) == values["serving"]["drainTimeout"], owner
        assert tpl["spec"]["terminationGracePeriodSeconds"] >= values["serving"]["drainTimeout"] + 5, owner
