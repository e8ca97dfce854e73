#!/usr/bin/env python3
"""Cross-checks of deploy/kubernetes/ that schema validation cannot see, for deploy/ci-checks.sh.

    check_manifests.py OUT_DIR

Reads every manifest under deploy/kubernetes/ (PyYAML) and the TOML of each ConfigMap (tomllib), writes
each ConfigMap's grpcgate.toml to OUT_DIR/<configmap name>/grpcgate.toml (for `grpcgate --check`), and
checks that the pieces fit together:
  - every kustomization lists exactly the YAML files beside it;
  - every Service, PodDisruptionBudget and ServiceMonitor selects pods or Services that exist, and the
    ports they name exist there;
  - the Deployment: >= 2 replicas, requests and limits, liveness /healthz and readiness /ready on the
    admin port of its config, the listener port matches, non-root (the image's uid), read-only root
    filesystem, preStop pause > the NLB's deregistration delay, terminationGracePeriodSeconds > pause +
    drain_timeout, workers = the CPU limit;
  - the NLB Service: AWS Load Balancer Controller, IP targets, health check on the admin port's /ready,
    cross-zone, and no PROXY protocol unless the listener has proxy_protocol = true;
  - every cluster finds its backends by DNS through a headless Service of this directory (its name,
    namespace and port), and that Service selects a workload's pods;
  - the HPA targets the Deployment.
Prints one line per check and exits 1 if any failed.
"""
import pathlib
import re
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
KDIR = ROOT / "deploy" / "kubernetes"
IMAGE_UID = 10001  # the Dockerfile's USER

failures = 0
passed = 0


def check(ok, what):
    global failures, passed
    if ok:
        passed += 1
        print(f"  ok    {what}")
    else:
        failures += 1
        print(f"  FAIL  {what}")


def duration_s(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unsupported duration {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def cpu_cores(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def main():
    out = pathlib.Path(sys.argv[1])
    docs = []  # (path, dir, doc)
    for path in sorted(KDIR.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, path.parent, doc))

    # kustomizations list exactly the files beside them
    for path, d, doc in docs:
        if doc.get("kind") != "Kustomization":
            continue
        listed = set(doc.get("resources", []))
        present = {p.name for p in d.glob("*.yaml") if p.name != "kustomization.yaml"}
        rel = path.relative_to(ROOT)
        check(listed == present, f"{rel} lists every manifest beside it (missing {sorted(present - listed)}, "
              f"absent {sorted(listed - present)})")

    def of_kind(kind, d=None):
        return [doc for _, dd, doc in docs if doc.get("kind") == kind and (d is None or dd == d)]

    for d in sorted({dd for _, dd, _ in docs}):
        name = d.relative_to(ROOT)
        workloads = of_kind("Deployment", d) + of_kind("StatefulSet", d)
        services = of_kind("Service", d)
        configmaps = {cm["metadata"]["name"]: cm for cm in of_kind("ConfigMap", d)}
        configs = {}
        for cm_name, cm in configmaps.items():
            text = cm.get("data", {}).get("grpcgate.toml")
            check(text is not None, f"{name}: ConfigMap {cm_name} has grpcgate.toml")
            if text is None:
                continue
            try:
                configs[cm_name] = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                check(False, f"{name}: ConfigMap {cm_name}: TOML parses ({e})")
                continue
            dest = out / cm_name / "grpcgate.toml"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            print(f"  wrote {dest}")

        def pod_ports(w):
            spec = w["spec"]["template"]["spec"]
            return {p["name"]: p["containerPort"]
                    for c in spec.get("containers", []) + spec.get("initContainers", [])
                    for p in c.get("ports", []) if "name" in p}

        for svc in services:
            sel = svc["spec"].get("selector", {})
            targets = [w for w in workloads if matches(sel, w["spec"]["template"]["metadata"]["labels"])]
            sname = svc["metadata"]["name"]
            check(len(targets) == 1, f"{name}: Service {sname} selects the pods of one workload")
            for port in svc["spec"]["ports"]:
                tp = port.get("targetPort", port["port"])
                if targets and isinstance(tp, str):
                    check(tp in pod_ports(targets[0]), f"{name}: Service {sname} targetPort {tp} is a pod port")

        for pdb in of_kind("PodDisruptionBudget", d):
            sel = pdb["spec"]["selector"]["matchLabels"]
            check(any(matches(sel, w["spec"]["template"]["metadata"]["labels"]) for w in workloads),
                  f"{name}: PodDisruptionBudget {pdb['metadata']['name']} selects pods")

        for sm in of_kind("ServiceMonitor", d):
            sel = sm["spec"]["selector"]["matchLabels"]
            chosen = [s for s in services if matches(sel, s["metadata"].get("labels", {}))]
            check(len(chosen) == 1 and chosen[0]["spec"]["type"] == "ClusterIP",
                  f"{name}: ServiceMonitor {sm['metadata']['name']} selects one ClusterIP Service")
            for ep in sm["spec"]["endpoints"]:
                check(bool(chosen) and ep["port"] in [p["name"] for p in chosen[0]["spec"]["ports"]],
                      f"{name}: ServiceMonitor port {ep['port']} exists on the Service")

        for hpa in of_kind("HorizontalPodAutoscaler", d):
            ref = hpa["spec"]["scaleTargetRef"]
            check(any(w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"] for w in workloads),
                  f"{name}: HPA {hpa['metadata']['name']} targets {ref['kind']}/{ref['name']}, which exists")
            check(hpa["spec"]["minReplicas"] >= 2, f"{name}: HPA keeps >= 2 replicas")

        # every pod that runs grpcgate
        for w in workloads:
            spec = w["spec"]["template"]["spec"]
            wname = f"{w['kind']}/{w['metadata']['name']}"
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                if c.get("image") != "grpcgate":
                    continue
                args = c.get("args", [])
                cfg_path = args[args.index("--config") + 1] if "--config" in args else None
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                vols = {v["name"]: v for v in spec.get("volumes", [])}
                cm_name = None
                if cfg_path:
                    mp = str(pathlib.PurePosixPath(cfg_path).parent)
                    vol = vols.get(mounts.get(mp, ""), {})
                    cm_name = vol.get("configMap", {}).get("name")
                check(cm_name in configs, f"{name}: {wname}: --config {cfg_path} is a mounted ConfigMap's file")
                if cm_name not in configs:
                    continue
                cfg = configs[cm_name]
                admin_port = int(cfg["admin"]["listen"].rsplit(":", 1)[1])
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
                check(ports.get("admin") == admin_port, f"{name}: {wname}: port 'admin' = [admin] listen port {admin_port}")
                for probe, path in [("livenessProbe", "/healthz"), ("startupProbe", "/healthz"), ("readinessProbe", "/ready")]:
                    if probe == "readinessProbe" and w["spec"]["template"]["spec"].get("initContainers") and c in spec.get("initContainers", []):
                        continue  # the sidecar deliberately has no readiness probe
                    got = c.get(probe, {}).get("httpGet", {})
                    check(got.get("path") == path and got.get("port") == "admin",
                          f"{name}: {wname}: {probe} GET {path} on the admin port")
                sc = c.get("securityContext", {})
                psc = spec.get("securityContext", {})
                check(sc.get("readOnlyRootFilesystem") is True, f"{name}: {wname}: read-only root filesystem")
                check(sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"],
                      f"{name}: {wname}: no privilege escalation, all capabilities dropped")
                check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == IMAGE_UID,
                      f"{name}: {wname}: runs as non-root uid {IMAGE_UID} (the image's)")
                res = c.get("resources", {})
                check({"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}),
                      f"{name}: {wname}: CPU and memory requests, memory limit")
                cpu_limit = res.get("limits", {}).get("cpu")
                if cpu_limit is not None:
                    check(cfg.get("workers") == int(cpu_cores(cpu_limit)),
                          f"{name}: {wname}: workers ({cfg.get('workers')}) = CPU limit ({cpu_limit})")
                drain = duration_s(cfg.get("drain_timeout", "30s"))
                pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
                grace = spec.get("terminationGracePeriodSeconds", 30)
                check(grace > pause + drain,
                      f"{name}: {wname}: terminationGracePeriodSeconds {grace} > preStop {pause} + drain_timeout {drain:g}")

                if w["kind"] != "Deployment" or c not in spec.get("containers", []):
                    continue
                # the edge Deployment
                check(w["spec"].get("replicas", 1) >= 2, f"{name}: {wname}: >= 2 replicas")
                check(w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0,
                      f"{name}: {wname}: rolling updates keep every replica until the new one is Ready")
                listener_ports = {int(l["listen"].rsplit(":", 1)[1]) for l in cfg["listeners"]}
                check(ports.get("grpc") in listener_ports, f"{name}: {wname}: port 'grpc' is a listener's port")
                lbs = [s for s in services if s["spec"].get("type") == "LoadBalancer"
                       and matches(s["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
                check(len(lbs) == 1, f"{name}: {wname}: one LoadBalancer Service")
                for lb in lbs:
                    a = lb["metadata"].get("annotations", {})
                    p = "service.beta.kubernetes.io/aws-load-balancer-"
                    check(a.get(p + "type") == "external" and a.get(p + "nlb-target-type") == "ip",
                          f"{name}: NLB by the AWS Load Balancer Controller with IP targets")
                    check(a.get(p + "healthcheck-protocol") == "http" and a.get(p + "healthcheck-port") == str(admin_port)
                          and a.get(p + "healthcheck-path") == "/ready",
                          f"{name}: NLB health check: HTTP GET /ready on admin port {admin_port}")
                    check("load_balancing.cross_zone.enabled=true" in a.get(p + "attributes", ""),
                          f"{name}: NLB cross-zone load balancing")
                    m = re.search(r"deregistration_delay\.timeout_seconds=(\d+)", a.get(p + "target-group-attributes", ""))
                    dereg = int(m.group(1)) if m else 300
                    check(pause > dereg, f"{name}: {wname}: preStop pause {pause} s > NLB deregistration delay {dereg} s")
                    check(dereg >= drain, f"{name}: NLB deregistration delay {dereg} s >= drain_timeout {drain:g} s")
                    pp = (p + "proxy-protocol") in a
                    edge_pp = any(l.get("proxy_protocol") for l in cfg["listeners"])
                    check(pp == edge_pp, f"{name}: PROXY protocol on the NLB ({pp}) and the listener ({edge_pp}) agree")

        ns = yaml.safe_load((KDIR / "kustomization.yaml").read_text())["namespace"]
        all_services = of_kind("Service", KDIR)
        all_workloads = of_kind("Deployment", KDIR) + of_kind("StatefulSet", KDIR)
        for cm_name, cfg in configs.items():
            for cl in cfg.get("clusters", []):
                where = f"{name}: ConfigMap {cm_name}: cluster {cl['name']}"
                dns = cl.get("dns")
                check(dns is not None, f"{where} finds its backends by DNS (dns = ...)")
                if dns is None:
                    continue
                host, port = dns.rsplit(":", 1)
                svcs = [s for s in all_services
                        if host.rstrip(".") == f"{s['metadata']['name']}.{ns}.svc.cluster.local"]
                check(len(svcs) == 1, f"{where}: {host} is a Service of namespace {ns}")
                for svc in svcs:
                    check(svc["spec"].get("clusterIP") == "None",
                          f"{where}: Service {svc['metadata']['name']} is headless (one record per pod)")
                    check(int(port) in [p["port"] for p in svc["spec"]["ports"]],
                          f"{where}: port {port} is a port of Service {svc['metadata']['name']}")
                    check(any(matches(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
                              for w in all_workloads),
                          f"{where}: Service {svc['metadata']['name']} selects a workload's pods")

    print(f"manifest cross-checks: {passed} ok, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
