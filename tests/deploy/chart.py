"""chart.py - the Helm chart as the tests see it: rendered by Helm itself
(helm-python-sdk: Helm's Go SDK as a shared library, offline), never by a
template engine of our own.

Environment: ENTROKV_BIN (the binary; default build/release/entrokv).
"""
import os

import helm_python as helm
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "helm", "entrokv")
EXAMPLES = sorted(f[:-5] for f in os.listdir(os.path.join(CHART, "examples")) if f.endswith(".yaml"))
RELEASE, NAMESPACE = "demo", "llm"


def example_values(name):
    """The values of examples/NAME.yaml ("default": none)."""
    if name == "default":
        return {}
    with open(os.path.join(CHART, "examples", name + ".yaml")) as f:
        return helm.values_from_yaml(f.read())


def merge(base, extra):
    """base with extra's keys laid over it, recursively (as helm's -f then --set)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values=None):
    """{template path: text} from `helm template`."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(values=None):
    """Every Kubernetes object the chart renders, as dicts."""
    out = []
    for path, text in sorted(render(values).items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def find(objs, kind, name_suffix=""):
    got = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(got) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in got]}"
    return got[0]


def pod_specs(objs):
    """(owner name, pod template) of every workload, LeaderWorkerSet templates included."""
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            out.append((o["metadata"]["name"], o["spec"]["template"]))
        elif o["kind"] == "LeaderWorkerSet":
            t = o["spec"]["leaderWorkerTemplate"]
            out.append((o["metadata"]["name"] + "-leader", t["leaderTemplate"]))
            out.append((o["metadata"]["name"] + "-rank", t["workerTemplate"]))
    return out
