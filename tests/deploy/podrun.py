"""podrun.py - runs the pods a Helm render describes on this machine, the
way a container runtime would, with the binary standing in for the image:

- network: every pod gets a network namespace of its own (ip netns) with
  an eth0 on a bridge in a "node" namespace (10.214.0.0/24); nothing is
  added to this host's own namespace.
- names: /etc/netns/<ns>/hosts, which `ip netns exec` binds over /etc/hosts,
  holds the Services' records: a ClusterIP Service's name resolves from the
  start (to its pods, standing in for the virtual IP), a headless Service's
  name lists the READY pods only, rewritten in place as probes pass (what
  the endpoints controller and cluster DNS do).
- filesystem: each container runs in a private mount namespace, chrooted
  into a root that is a read-only tmpfs with this host's /usr, /lib, /etc,
  /bin bound read-only, the binary at /usr/local/bin/entrokv, and the pod's
  volumes at their exact mountPaths: ConfigMap keys and Secret items as
  files with the rendered content (and defaultMode), emptyDirs as empty
  directories. Paths in args, env and config files are NOT rewritten.
- identity: runAsUser / runAsGroup / fsGroup of the pod's securityContext
  through setpriv, with every capability dropped and no_new_privs set.
- environment: the rendered env (value only), what Kubernetes always adds
  (KUBERNETES_SERVICE_HOST and _PORT, HOSTNAME) and the image's PATH.

Needs root, iproute2, unshare, chroot and setpriv; NetworkNotAvailable
otherwise (the test skips).
"""
import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time

SUBNET = "10.214.0"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_DIRS = ("usr", "lib", "lib64", "lib32", "bin", "sbin", "etc")


class NetworkNotAvailable(Exception):
    pass


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


class Pod:
    def __init__(self, name, template, ip, ns):
        self.name, self.template, self.ip, self.ns = name, template, ip, ns
        self.labels = template["metadata"].get("labels", {})
        self.spec = template["spec"]
        self.procs = {}  # container name -> Popen
        self.volumes = {}  # volume name -> host dir

    def containers(self):
        return self.spec["containers"]

    def port(self, container, port):
        """A probe's port: a number, or a name from the container's ports."""
        if isinstance(port, int):
            return port
        for p in container.get("ports", []):
            if p["name"] == port:
                return p["containerPort"]
        raise KeyError(f"{self.name}: no port named {port}")


class Cluster:
    """Pods on one "node" with the Services that select them."""

    def __init__(self, objs, binary, workdir, seed_files=None):
        if os.geteuid() != 0:
            raise NetworkNotAvailable("network namespaces need root")
        for tool in ("ip", "unshare", "chroot", "setpriv"):
            if not shutil.which(tool):
                raise NetworkNotAvailable(f"{tool} is not installed")
        self.objs, self.binary, self.dir = objs, binary, workdir
        self.seed_files = seed_files or {}  # volume name -> {file name: host path to link}
        self.tag = f"ekvd{os.getpid()}"
        self.node_ns = self.tag + "n"
        self.namespaces, self.pods, self.services = [], [], []
        self.ready = set()

    # ---- network ----
    def _netns(self, name):
        r = sh("ip", "netns", "add", name, check=False)
        if r.returncode != 0:
            raise NetworkNotAvailable(f"ip netns add: {r.stderr.strip()}")
        self.namespaces.append(name)
        os.makedirs(f"/etc/netns/{name}", exist_ok=True)
        # no cluster DNS server: lookups that miss the hosts file fail at once
        with open(f"/etc/netns/{name}/resolv.conf", "w") as f:
            f.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        open(f"/etc/netns/{name}/hosts", "w").close()
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")

    def _network(self):
        for ns in list(ip for ip in os.popen("ip netns list").read().split() if ip.startswith("ekvd")):
            owner = ns[4:-1]
            if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                sh("ip", "netns", "del", ns, check=False)
                shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self._netns(self.node_ns)
        r = sh("ip", "netns", "exec", self.node_ns, "ip", "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode != 0:
            raise NetworkNotAvailable(f"no bridge: {r.stderr.strip()}")
        sh("ip", "netns", "exec", self.node_ns, "ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        sh("ip", "netns", "exec", self.node_ns, "ip", "link", "set", "br0", "up")

    def _pod_network(self, i, pod):
        sh("ip", "netns", "exec", self.node_ns, "ip", "link", "add", f"v{i}", "type", "veth",
           "peer", "name", "eth0", "netns", pod.ns)
        sh("ip", "netns", "exec", self.node_ns, "ip", "link", "set", f"v{i}", "master", "br0")
        sh("ip", "netns", "exec", self.node_ns, "ip", "link", "set", f"v{i}", "up")
        sh("ip", "netns", "exec", pod.ns, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        sh("ip", "netns", "exec", pod.ns, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", pod.ns, "ip", "route", "add", "default", "via", f"{SUBNET}.1")

    # ---- objects ----
    def _pods_of(self, obj):
        """The pods a workload creates on one node."""
        kind, name, spec = obj["kind"], obj["metadata"]["name"], obj.get("spec", {})
        if kind == "Deployment":
            return [(f"{name}-{i}", spec["template"]) for i in range(spec.get("replicas", 1))]
        if kind == "StatefulSet":
            return [(f"{name}-{i}", spec["template"]) for i in range(spec["replicas"])]
        if kind == "DaemonSet":
            return [(f"{name}-node0", spec["template"])]
        return []

    def hosts_text(self):
        lines = ["127.0.0.1 localhost"]
        for pod in self.pods:
            lines.append(f"{pod.ip} {pod.name}")
        for svc in self.services:
            name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            headless = svc["spec"].get("clusterIP") == "None"
            sel = svc["spec"]["selector"]
            for pod in self.pods:
                if not sel.items() <= pod.labels.items():
                    continue
                if headless and pod.name not in self.ready:
                    continue
                lines.append(f"{pod.ip} {name} {name}.{ns}.svc {name}.{ns}.svc.cluster.local")
        return "\n".join(lines) + "\n"

    def write_hosts(self):
        """Rewrites every namespace's hosts file in place (same inode: the
        bind mounts `ip netns exec` made keep seeing it)."""
        text = self.hosts_text()
        for ns in self.namespaces:
            with open(f"/etc/netns/{ns}/hosts", "r+") as f:
                f.truncate(0)
                f.write(text)

    # ---- volumes ----
    def _volumes(self, pod):
        sc = pod.spec.get("securityContext", {})
        gid = sc.get("fsGroup", sc.get("runAsGroup", 0))
        by_kind = {o["metadata"]["name"]: o for o in self.objs if o["kind"] in ("ConfigMap", "Secret")}
        for vol in pod.spec.get("volumes", []):
            d = os.path.join(self.dir, pod.name, "volumes", vol["name"])
            os.makedirs(d)
            if "configMap" in vol or "secret" in vol:
                src = vol.get("configMap") or vol["secret"]
                obj = by_kind[src.get("name") or src["secretName"]]
                data = obj.get("data", {})
                if obj["kind"] == "Secret":
                    data = {k: base64.b64decode(v) for k, v in data.items()}
                else:
                    data = {k: v.encode() for k, v in data.items()}
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    p = os.path.join(d, it["path"])
                    with open(p, "wb") as f:
                        f.write(data[it["key"]])
                    os.chown(p, 0, gid)
                    os.chmod(p, it.get("mode", src.get("defaultMode", 0o644)))
                os.chmod(d, 0o755)
            elif "emptyDir" in vol:
                os.chown(d, 0, gid)
                os.chmod(d, 0o2775)  # as fsGroup makes it
                for fname, host in self.seed_files.get(vol["name"], {}).items():
                    try:
                        os.link(host, os.path.join(d, fname))
                    except OSError:
                        shutil.copyfile(host, os.path.join(d, fname))
            elif "hostPath" in vol:
                d = vol["hostPath"]["path"]
            else:
                raise NotImplementedError(f"{pod.name}: volume {vol}")
            pod.volumes[vol["name"]] = d

    # ---- containers ----
    def command(self, pod, c):
        """The argv that runs container c of pod, as the runtime would."""
        root = os.path.join(self.dir, pod.name, "root-" + c["name"])
        os.makedirs(root)
        sc = {**pod.spec.get("securityContext", {}), **c.get("securityContext", {})}
        uid, gid = sc.get("runAsUser", 0), sc.get("runAsGroup", 0)
        groups = [str(sc["fsGroup"])] if "fsGroup" in sc else []
        q = shlex.quote
        setup = ["set -e", f"mount -t tmpfs -o mode=755 root {q(root)}"]
        mount_paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        ro_later = []
        for d in HOST_DIRS:
            if os.path.islink("/" + d):
                setup.append(f"ln -s {q(os.readlink('/' + d))} {q(root)}/{d}")
            elif not os.path.isdir("/" + d):
                continue
            elif any(m.startswith(f"/{d}/") for m in mount_paths):
                # a mountpoint inside a host directory (/etc/entrokv): an
                # overlay, as the runtime creates it in the image's layers;
                # /etc/hosts and resolv.conf bound again (overlay does not
                # see the bind mounts `ip netns exec` made)
                ovl = os.path.join(self.dir, pod.name, f"ovl-{c['name']}-{d}")
                os.makedirs(ovl + "/upper")
                os.makedirs(ovl + "/work")
                setup += [f"mkdir -p {q(root)}/{d}",
                          f"mount -t overlay overlay -o lowerdir=/{d},upperdir={q(ovl)}/upper,"
                          f"workdir={q(ovl)}/work {q(root)}/{d}"]
                if d == "etc":
                    setup += [f"mount --bind /etc/{f} {q(root)}/etc/{f}" for f in ("hosts", "resolv.conf")]
                ro_later.append(f"mount -o remount,ro {q(root)}/{d}")
            else:
                setup += [f"mkdir -p {q(root)}/{d}", f"mount --rbind /{d} {q(root)}/{d}",
                          f"mount -o remount,bind,ro {q(root)}/{d}"]
        for d in ("dev", "proc", "sys"):
            setup += [f"mkdir -p {q(root)}/{d}", f"mount --rbind /{d} {q(root)}/{d}"]
        setup += [f"mount -t tmpfs -o mode=755 bin {q(root)}/usr/local/bin",
                  f"touch {q(root)}/usr/local/bin/entrokv",
                  f"mount --bind {q(self.binary)} {q(root)}/usr/local/bin/entrokv"]
        for m in c.get("volumeMounts", []):
            target = root + m["mountPath"]
            setup += [f"mkdir -p {q(target)}", f"mount --bind {q(pod.volumes[m['name']])} {q(target)}"]
            if m.get("readOnly"):
                setup.append(f"mount -o remount,bind,ro {q(target)}")
        setup += ro_later
        if sc.get("readOnlyRootFilesystem"):
            setup.append(f"mount -o remount,bind,ro {q(root)}")
        env = {"PATH": IMAGE_PATH, "HOSTNAME": pod.name, "KUBERNETES_SERVICE_HOST": "10.96.0.1",
               "KUBERNETES_SERVICE_PORT": "443", "KUBERNETES_SERVICE_PORT_HTTPS": "443"}
        for e in c.get("env", []):
            assert "value" in e, f"{pod.name}/{c['name']}: env {e['name']} is not a plain value"
            env[e["name"]] = e["value"]
        if uid == 0 and not sc.get("runAsNonRoot"):
            priv = []
        else:
            assert uid != 0, f"{pod.name}: runAsNonRoot without runAsUser"
            priv = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
                    f"--groups={','.join(groups)}" if groups else "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        drop = c.get("securityContext", {}).get("capabilities", {}).get("drop", [])
        assert priv or drop != ["ALL"], "capabilities are dropped only with setpriv"
        argv = ["chroot", root, *priv, "env", "-i", *[f"{k}={v}" for k, v in env.items()],
                *c["command"], *c.get("args", [])]
        script = "\n".join(setup) + "\nexec " + " ".join(q(a) for a in argv)
        return ["ip", "netns", "exec", pod.ns, "unshare", "-m", "--propagation", "private",
                "sh", "-c", script]

    def start(self):
        self._network()
        self.services = [o for o in self.objs if o["kind"] == "Service"]
        n = 10
        for obj in self.objs:
            for name, tpl in self._pods_of(obj):
                ns = f"{self.tag}{len(self.pods)}"
                self._netns(ns)
                pod = Pod(name, tpl, f"{SUBNET}.{n}", ns)
                n += 1
                self._pod_network(len(self.pods), pod)
                self._volumes(pod)
                self.pods.append(pod)
        self.write_hosts()
        for pod in self.pods:
            self.run_pod(pod)

    def run_pod(self, pod):
        """Init containers one after the other (each must exit 0), then the
        containers, in the background."""
        logs = os.path.join(self.dir, pod.name)
        for c in pod.spec.get("initContainers", []):
            with open(os.path.join(logs, c["name"] + ".log"), "wb") as log:
                r = subprocess.run(self.command(pod, c), stdout=log, stderr=subprocess.STDOUT, timeout=300)
            assert r.returncode == 0, f"{pod.name} init {c['name']} exited {r.returncode}: {self.log(pod, c['name'])}"
        for c in pod.containers():
            log = open(os.path.join(logs, c["name"] + ".log"), "wb")
            pod.procs[c["name"]] = subprocess.Popen(self.command(pod, c), stdout=log, stderr=subprocess.STDOUT)
            log.close()

    def log(self, pod, container):
        with open(os.path.join(self.dir, pod.name, container + ".log"), errors="replace") as f:
            return f.read()[-4000:]

    def all_logs(self):
        return "\n".join(f"--- {p.name}/{c}:\n{self.log(p, c)}" for p in self.pods for c in p.procs)

    def exited(self):
        return [(p.name, c, pr.returncode) for p in self.pods for c, pr in p.procs.items() if pr.poll() is not None]

    def probe_spec(self):
        """What the prober (client.py, in the node namespace) checks: every
        probe of every container, with its port resolved."""
        out = []
        for pod in self.pods:
            for c in pod.containers():
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    p = c.get(kind)
                    if not p:
                        continue
                    h = p.get("httpGet") or p.get("grpc") or p.get("tcpSocket")
                    out.append({"pod": pod.name, "ip": pod.ip, "kind": kind,
                                "type": next(k for k in ("httpGet", "grpc", "tcpSocket") if k in p),
                                "port": pod.port(c, h["port"]), "path": h.get("path"),
                                "service": h.get("service", "")})
        return out

    def node_exec(self, argv, **kw):
        return subprocess.run(["ip", "netns", "exec", self.node_ns, *argv], **kw)

    def stop(self, timeout):
        """SIGTERM every container (kubectl delete); their exit codes."""
        for p in self.pods:
            for pr in p.procs.values():
                if pr.poll() is None:
                    pr.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.time() + timeout
        for p in self.pods:
            for c, pr in p.procs.items():
                try:
                    pr.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pr.kill()
                    pr.wait()
                codes[f"{p.name}/{c}"] = pr.returncode
        return codes

    def cleanup(self):
        for p in self.pods:
            for pr in p.procs.values():
                if pr.poll() is None:
                    pr.kill()
                    pr.wait()
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
