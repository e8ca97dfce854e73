#!/usr/bin/env python3
"""Plots benches/soak's CSV as an SVG (no plotting library needed) and checks that RSS and open files
stay flat after the warm-up.

    plot.py soak.csv soak.svg [--warmup SECONDS]

Flat: every sample after the warm-up within 5 % of the first one after it (files: within 5 % or 2
descriptors, whichever is more, since a handful of connections open and close with each reload).
Exits 1 if not flat or if any call had an unexpected outcome.
"""
import argparse
import csv
import sys

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("svg")
ap.add_argument("--warmup", type=float, default=60)
a = ap.parse_args()

rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(a.csv))]
if len(rows) < 3:
    sys.exit("too few samples")

W, H, PAD = 760, 200, 50
series = [
    ("rss_kib", "resident memory (KiB)", "#1f77b4"),
    ("fds", "open file descriptors", "#d62728"),
    ("cpu_rate", "CPU (cores)", "#2ca02c"),
    ("call_rate", "calls per second", "#9467bd"),
]
for i, r in enumerate(rows):
    p = rows[i - 1] if i else None
    dt = (r["t_s"] - p["t_s"]) if p else 0
    r["cpu_rate"] = (r["cpu_s"] - p["cpu_s"]) / dt if dt else 0
    r["call_rate"] = (r["calls"] - p["calls"]) / dt if dt else 0
tmax = max(r["t_s"] for r in rows) or 1
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{len(series) * H}" '
       'font-family="sans-serif" font-size="12">']
for n, (key, title, color) in enumerate(series):
    y0 = n * H
    vals = [r[key] for r in rows]
    lo, hi = 0, max(vals) * 1.1 or 1
    def xy(r):
        x = PAD + (W - 2 * PAD) * r["t_s"] / tmax
        y = y0 + H - PAD / 2 - (H - PAD) * (r[key] - lo) / (hi - lo)
        return f"{x:.1f},{y:.1f}"
    out.append(f'<text x="{PAD}" y="{y0 + 16}">{title}: {vals[-1]:.0f} at the end, max {max(vals):.0f}</text>')
    out.append(f'<line x1="{PAD}" y1="{y0 + H - PAD / 2}" x2="{W - PAD}" y2="{y0 + H - PAD / 2}" stroke="#999"/>')
    out.append(f'<text x="{W - PAD}" y="{y0 + H - 8}" text-anchor="end">{tmax:.0f} s</text>')
    out.append(f'<text x="{PAD - 4}" y="{y0 + PAD / 2 + 4}" text-anchor="end">{hi:.0f}</text>')
    wx = PAD + (W - 2 * PAD) * a.warmup / tmax
    out.append(f'<line x1="{wx:.1f}" y1="{y0 + 20}" x2="{wx:.1f}" y2="{y0 + H - PAD / 2}" stroke="#ccc" stroke-dasharray="4"/>')
    out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{" ".join(xy(r) for r in rows)}"/>')
out.append("</svg>")
open(a.svg, "w").write("\n".join(out))

after = [r for r in rows if r["t_s"] >= a.warmup]
ok = True
for key, slack in (("rss_kib", 0), ("fds", 2)):
    base = after[0][key]
    worst = max(abs(r[key] - base) for r in after)
    allowed = max(base * 0.05, slack)
    flat = worst <= allowed
    ok &= flat
    print(f"{key}: first after warm-up {base:.0f}, largest deviation {worst:.0f} "
          f"({100 * worst / base:.1f} %), allowed {allowed:.0f}: {'flat' if flat else 'NOT flat'}")
bad = rows[-1]["unexpected"]
lost = rows[-1].get("client_goaway_failures", 0)
print(f"calls {rows[-1]['calls']:.0f}, unexpected outcomes {bad:.0f}, "
      f"failed by the client's own h2 GOAWAY (too_many_internal_resets) {lost:.0f}")
ok &= bad == 0
# Those client-side GOAWAYs must not have been the proxy's: it closes a connection for abuse only with
# a count under reason="abuse", and logs it.
import pathlib
metrics = pathlib.Path(a.csv).with_name("metrics.txt")
if metrics.exists():
    abuse = [l for l in metrics.read_text().splitlines()
             if l.startswith("grpcgate_downstream_connections_closed_total") and 'reason="abuse"' in l
             and not l.endswith(" 0")]
    print(f"proxy closed connections for abuse: {abuse or 'none'}")
    ok &= not abuse
print("soak: PASS" if ok else "soak: FAIL")
sys.exit(0 if ok else 1)
