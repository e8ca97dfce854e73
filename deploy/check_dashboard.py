#!/usr/bin/env python3
"""Checks that every metric the Grafana dashboard queries exists in a real /metrics output.

    check_dashboard.py deploy/grafana/grpcgate.json METRICS_TEXT_FILE

Takes every PromQL expression of the dashboard (panel targets and template variable queries), and checks:
  - every metric it selects (`name{...}`, `label_values(name, ...)`) is a series in the scrape, with the
    exact name (histogram series with their _bucket/_sum/_count suffix);
  - every label it filters on (`{label=...}`) is a label of that metric;
  - every label it groups or matches by (`by (...)`, `on (...)`) is a label of one of the expression's
    metrics.
Labels Prometheus adds to each target (namespace, pod, ...) and `le` count as present. Metrics that come
from elsewhere (cAdvisor) are listed in EXTERNAL with where they come from, and are not looked for.
Exits 1 on the first kind of mismatch, after printing all of them.
"""
import json
import re
import sys

# Added by Prometheus / the Prometheus Operator to every scraped series.
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "container"}
# Not grpcgate's: scraped from the kubelet's cAdvisor by a standard kube-prometheus-stack.
EXTERNAL = {"container_cpu_usage_seconds_total": {"namespace", "pod", "container", "cpu", "node", "id", "image", "name"}}
PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "rate", "increase", "irate", "histogram_quantile", "by",
                "on", "ignoring", "group_left", "group_right", "without", "label_values", "topk", "bottomk"}


def exprs_of(dash):
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            out.append((f"variable ${v['name']}", q))
    return out


def parse_metrics(text):
    series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
        if not m:
            continue
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
        series.setdefault(m.group(1), set()).update(labels)
    return series


def main():
    dash = json.load(open(sys.argv[1]))
    series = parse_metrics(open(sys.argv[2]).read())
    known = dict(series)
    known.update(EXTERNAL)
    problems = []
    used = set()
    for where, expr in exprs_of(dash):
        # Grafana's variables are not PromQL: $__rate_interval, $cluster, ...
        e = re.sub(r"\$\{?[A-Za-z_]+\}?", "X", expr)
        names = set()
        for name, sel in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", e):
            names.add(name)
            for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", sel):
                if name in known and label not in known[name] | TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {label!r} (has {sorted(known[name])})")
        for name in re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", e):
            names.add(name)
        for name in re.findall(r"\b(grpcgate_[a-zA-Z0-9_]+)", e):
            names.add(name)
        if not names:
            problems.append(f"{where}: no metric found in {expr!r}")
        for name in sorted(names):
            used.add(name)
            if name not in known:
                problems.append(f"{where}: {name} is not in the /metrics output")
        labels_here = set().union(*(known.get(n, set()) for n in names)) | TARGET_LABELS | {"le"}
        for group in re.findall(r"\b(?:by|on|ignoring|without)\s*\(([^)]*)\)", e):
            for label in [g.strip() for g in group.split(",") if g.strip()]:
                if label not in labels_here:
                    problems.append(f"{where}: groups by {label!r}, a label of none of {sorted(names)}")
    for name in sorted(used):
        src = "external: " + "cAdvisor" if name in EXTERNAL else "in /metrics"
        print(f"  {name:48} {src}")
    grpcgate_exported = {re.sub(r"_(bucket|sum|count)$", "", n) for n in series if n.startswith("grpcgate_")}
    grpcgate_used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used if n.startswith("grpcgate_")}
    unused = sorted(grpcgate_exported - grpcgate_used)
    if unused:
        print(f"  (exported but not on the dashboard: {', '.join(unused)})")
    for p in problems:
        print(f"  FAIL  {p}")
    print(f"dashboard: {len(used)} metrics queried, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
