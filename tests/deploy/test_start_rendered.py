"""test_start_rendered.py - start what the chart renders: the cpu-small
example (a coordinator, two worker groups, one KV store daemon) is rendered
by Helm, and every container runs with its command, args and env exactly as
rendered, its volumes at their mountPaths with the rendered ConfigMap and
Secret content, as the rendered user without capabilities on a read-only
root, each pod in a network namespace of its own, Service names resolved as
cluster DNS would (podrun.py). Init containers run first (fetch-model finds
the model already in its emptyDir, as a node cache would leave it: no
download). A prober in the node's namespace waits on the rendered probes;
the coordinator finds the workers through the headless Service's records
(--workers dns:...), which list only ready pods. Then chat completions go
through the coordinator's Service name and reach both worker groups, the
KV store answers /metrics, SIGTERM fails the coordinator's readiness probe
while its liveness probe still passes, and every process exits 0 within its
terminationGracePeriodSeconds.

A flag renamed in the binary, a config key or ENTROKV_* variable it does not
know, a probe path or port it does not serve: each fails this test.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from chart import ROOT, example_values, find, objects
from podrun import Cluster, NetworkNotAvailable

BIN = os.path.abspath(os.environ.get("ENTROKV_BIN", os.path.join(ROOT, "build", "release", "entrokv")))
MODEL_DIR = os.path.join(ROOT, "models")
HERE = os.path.dirname(os.path.abspath(__file__))


class Client:
    """client.py in the node's network namespace."""

    def __init__(self, cluster):
        self.proc = subprocess.Popen(["ip", "netns", "exec", cluster.node_ns, sys.executable,
                                      os.path.join(HERE, "client.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "client.py exited"
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def wait_ready(cluster, client, timeout):
    """Probes every pod until all are ready, the way the kubelet does: the
    readiness probe counts once the startup probe passed; a liveness probe
    that fails after startup is a failure here (the kubelet would restart
    the container). Ready pods are published in the headless Services."""
    probes = cluster.probe_spec()
    deadline = time.time() + timeout
    started = set()
    last = None
    while time.time() < deadline:
        dead = cluster.exited()
        assert not dead, f"containers exited: {dead}\n{cluster.all_logs()}"
        res = client.ask(op="probe", probes=probes)["results"]
        by_pod = {}
        for p, r in zip(probes, res):
            by_pod.setdefault(p["pod"], {})[p["kind"]] = r
        for pod, r in by_pod.items():
            if r.get("startupProbe", True) is True:
                started.add(pod)
            if pod in started:
                assert r.get("livenessProbe", True) is True, f"{pod} liveness: {r}\n{cluster.all_logs()}"
        ready = {pod for pod, r in by_pod.items() if pod in started and r.get("readinessProbe", True) is True}
        if ready != cluster.ready:
            cluster.ready = ready
            cluster.write_hosts()
        if len(ready) == len(cluster.pods):
            return
        last = by_pod
        time.sleep(0.5)
    pytest.fail(f"pods not ready after {timeout} s: {last}\n{cluster.all_logs()}")


def test_start_what_cpu_small_renders():
    assert os.path.exists(BIN), f"no binary at {BIN} (set ENTROKV_BIN)"
    values = example_values("cpu-small")
    objs = objects(values)
    model_file = values.get("model", {}).get("file", "SmolLM2-135M-Instruct.Q4_1.gguf")
    model = os.path.join(MODEL_DIR, model_file)
    assert os.path.exists(model), f"no model at {model} (scripts/setup.sh fetches it)"
    workers = find(objs, "StatefulSet", "-worker")
    assert workers["spec"]["replicas"] == 2
    coord = find(objs, "Deployment", "-coordinator")
    grace = coord["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    with tempfile.TemporaryDirectory(prefix="ekv-pods-") as d:
        os.chmod(d, 0o755)
        try:
            cluster = Cluster(objs, BIN, d, seed_files={"model": {model_file: model}})
            cluster.start()
        except NetworkNotAvailable as e:
            pytest.skip(str(e))
        client = None
        try:
            assert len(cluster.pods) == 4, [p.name for p in cluster.pods]  # coordinator, 2 workers, 1 kvstore
            client = Client(cluster)
            wait_ready(cluster, client, timeout=240)

            svc = find(objs, "Service", "-entrokv")  # the API
            http = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
            base = f"http://{svc['metadata']['name']}:{http}"
            models = client.ask(op="get", url=base + "/v1/models")
            assert models["status"] == 200, models
            model_id = json.loads(models["body"])["data"][0]["id"]
            kv = values["serving"]["kv"]
            out = client.ask(op="chat", base_url=base + "/v1", model=model_id, n=8,
                             extra={"kv_method": kv["method"], "kv_budget": kv["budget"]})
            assert "error" not in out, f"{out}\n{cluster.all_logs()}"
            assert len(out["texts"]) == 8 and all(isinstance(t, str) for t in out["texts"])
            served = [p.name for p in cluster.pods if "-worker-" in p.name and " accepted " in cluster.log(p, "worker")]
            assert len(served) == 2, f"requests reached only {served}\n{cluster.all_logs()}"

            kvsvc = find(objs, "Service", "-kvstore")
            kvhttp = next(p["port"] for p in kvsvc["spec"]["ports"] if p["name"] == "http")
            m = client.ask(op="get", url=f"http://{kvsvc['metadata']['name']}:{kvhttp}/metrics")
            assert m["status"] == 200 and "entrokv_kvstore_capacity_bytes" in m["body"], m

            # SIGTERM to the coordinator: its rendered readiness probe fails
            # at once (traffic leaves) while liveness still passes (no restart)
            cpod = next(p for p in cluster.pods if "-coordinator-" in p.name)
            cpod.procs["coordinator"].send_signal(signal.SIGTERM)
            probes = [p for p in cluster.probe_spec() if p["pod"] == cpod.name and p["kind"] != "startupProbe"]
            res = dict(zip((p["kind"] for p in probes), client.ask(op="probe", probes=probes)["results"]))
            assert res["readinessProbe"] is not True and res["livenessProbe"] is True, res
            cpod.procs["coordinator"].wait(grace)  # drains on its own (a second signal would cut it short)

            codes = cluster.stop(timeout=grace)
            assert set(codes.values()) == {0}, f"{codes}\n{cluster.all_logs()}"
            if os.environ.get("EKV_DEPLOY_LOGS"):
                print(out, codes, cluster.all_logs())
        finally:
            if client:
                client.close()
            cluster.cleanup()
