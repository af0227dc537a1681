"""`tandem bench report RESULT.json [RESULT2.json ...] -o report.html`: one self-contained HTML page
(inline SVG, no scripts, no external files) from `tandem bench serve` (or `vllm bench serve`) result
files.

Sections: a summary table with the files side by side; CDFs of TTFT, TPOT, ITL and E2E latency
(one curve per file, from the per-request arrays); throughput and latency against the offered load
(request rate, else max concurrency), one curve per setup (label, and workload when they differ)
with files at two loads or more; failed requests by type.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from tandem.loadtests.bench_svg import Series, cdf_points, line_chart

SUMMARY_ROWS = (
    ("workload", "workload"), ("endpoint", "backend"), ("model", "model_id"), ("prompts", "num_prompts"),
    ("request rate (req/s)", "request_rate"), ("max concurrency", "max_concurrency"), ("completed", "completed"),
    ("failed", "failed"), ("not sent", "not_sent"), ("duration (s)", "duration"),
    ("input tokens", "total_input_tokens"), ("output tokens", "total_output_tokens"),
    ("request throughput (req/s)", "request_throughput"), ("request goodput (req/s)", "request_goodput"),
    ("output throughput (tok/s)", "output_throughput"), ("total token throughput (tok/s)", "total_token_throughput"),
)
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
REQUIRED_KEYS = ("completed", "duration", "request_throughput", "output_throughput")

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.note { color: #666; font-size: 13px; }
"""


def load_result(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a JSON result: {exc}") from exc
    missing = [k for k in REQUIRED_KEYS if k not in data] if isinstance(data, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ValueError(f"{path}: not a benchmark result (missing {', '.join(missing)})")
    return data


def _names(paths: list[str], results: list[dict[str, Any]]) -> list[str]:
    """Column names: the label, with the file name where labels repeat."""
    labels = [str(r.get("label") or Path(p).stem) for p, r in zip(paths, results)]
    return [f"{lab} ({Path(p).stem})" if labels.count(lab) > 1 else lab for p, lab in zip(paths, labels)]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if math.isfinite(v) else str(v)
    return escape(str(v))


def _percentile_keys(results: list[dict[str, Any]], metric: str) -> list[str]:
    pat = re.compile(rf"^p([0-9.]+)_{metric}_ms$")
    found = {k for r in results for k in r if pat.match(k)}
    return sorted(found, key=lambda k: float(pat.match(k).group(1)))  # type: ignore[union-attr]


def summary_table(names: list[str], results: list[dict[str, Any]]) -> str:
    rows = [(label, key) for label, key in SUMMARY_ROWS]
    for metric, title in LATENCIES:
        rows += [(f"{stat} {title} (ms)", f"{stat}_{metric}_ms") for stat in ("mean", "median", "std")]
        rows += [(f"{k.split('_')[0]} {title} (ms)", k) for k in _percentile_keys(results, metric)]
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{escape(label)}</td>{''.join(f'<td>{_fmt(r.get(key))}</td>' for r in results)}</tr>"
                   for label, key in rows)
    return f'<table id="summary-table"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def request_samples(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per-request latency samples in ms from a result's arrays (successful requests only)."""
    ttfts, lats, outs = result.get("ttfts", []), result.get("latencies", []), result.get("output_lens", [])
    errors = result.get("errors") or [""] * len(ttfts)
    itls = result.get("itls") or [[] for _ in ttfts]
    ok = [i for i in range(len(ttfts)) if not errors[i]]
    return {
        "ttft": [ttfts[i] * 1000 for i in ok],
        "tpot": [(lats[i] - ttfts[i]) / (outs[i] - 1) * 1000 for i in ok if outs[i] > 1],
        "itl": [g * 1000 for i in ok for g in itls[i]],
        "e2el": [lats[i] * 1000 for i in ok],
    }


def cdf_charts(names: list[str], results: list[dict[str, Any]]) -> str:
    samples = [request_samples(r) for r in results]
    charts = []
    for metric, title in LATENCIES:
        series = [Series(n, *cdf_points(s[metric])) for n, s in zip(names, samples)]
        charts.append(line_chart(series, title=f"{title} CDF", x_label=f"{title} (ms)", y_label="fraction of requests"
                                 if metric != "itl" else "fraction of token gaps"))
    return f'<div class="charts">{"".join(charts)}</div>'


def _load_groups(names: list[str], results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Files of one setup and workload: the label (or column name), plus the workload when several."""
    several = len({r.get("workload") for r in results}) > 1
    groups: dict[str, list[dict[str, Any]]] = {}
    for n, r in zip(names, results):
        name = str(r.get("label") or n) + (f" / {r.get('workload')}" if several else "")
        groups.setdefault(name, []).append(r)
    return groups


def _load_axis(groups: dict[str, list[dict[str, Any]]]) -> tuple[str, str] | None:
    """The offered-load field that varies within some group: request_rate (numeric), else max_concurrency."""
    for key, label in (("request_rate", "request rate (req/s)"), ("max_concurrency", "max concurrency")):
        for rs in groups.values():
            if len({r[key] for r in rs if _is_number(r.get(key))}) > 1:
                return key, label
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_charts(names: list[str], results: list[dict[str, Any]]) -> str:
    groups = _load_groups(names, results)
    axis = _load_axis(groups)
    if axis is None:
        return ('<p class="note">Give several result files of one setup at different request rates (or max '
                "concurrencies) to plot throughput against load.</p>")
    key, x_label = axis
    plots = [("output_throughput", "output throughput (tok/s)"), ("request_throughput", "request throughput (req/s)"),
             ("request_goodput", "request goodput (req/s)"), ("median_ttft_ms", "median TTFT (ms)"),
             ("p99_ttft_ms", "P99 TTFT (ms)"), ("median_tpot_ms", "median TPOT (ms)")]
    charts = []
    for metric, y_label in plots:
        series = []
        for label, rs in groups.items():
            pts = sorted((float(r[key]), float(r[metric])) for r in rs
                         if _is_number(r.get(key)) and _is_number(r.get(metric)))
            if len(pts) > 1:
                series.append(Series(label, [p[0] for p in pts], [p[1] for p in pts]))
        if series:
            charts.append(line_chart(series, title=f"{y_label} vs {x_label}", x_label=x_label, y_label=y_label,
                                     markers=True))
    return f'<div class="charts">{"".join(charts)}</div>'


def errors_table(names: list[str], results: list[dict[str, Any]]) -> str:
    kinds = sorted({k for r in results for k in (r.get("errors_by_type") or {})})
    if not kinds:
        return '<p class="note">No failed requests.</p>'
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    body = "".join(f"<tr><td>{escape(k)}</td>"
                   + "".join(f"<td>{(r.get('errors_by_type') or {}).get(k, 0)}</td>" for r in results) + "</tr>"
                   for k in kinds)
    return f'<table id="errors-table"><thead><tr><th>error</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_report(paths: list[str], results: list[dict[str, Any]], title: str) -> str:
    names = _names(paths, results)
    files = "".join(f"<li>{escape(n)}: {escape(p)}</li>" for n, p in zip(names, paths))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="note">Generated {datetime.now().strftime("%Y-%m-%d %H:%M")} by tandem bench report from:</p><ul>{files}</ul>
<h2 id="summary">Summary</h2>
{summary_table(names, results)}
<h2 id="latency-distributions">Latency distributions</h2>
{cdf_charts(names, results)}
<h2 id="throughput-vs-load">Throughput and latency vs load</h2>
{load_charts(names, results)}
<h2 id="errors">Errors</h2>
{errors_table(names, results)}
</body></html>
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="result JSON files of tandem bench serve")
    p.add_argument("-o", "--output", required=True, help="the HTML file to write")
    p.add_argument("--title", default="Tandem serving benchmark")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = [load_result(p) for p in args.results]
        html = render_report(args.results, results, args.title)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(html)
    except (ValueError, OSError) as exc:
        print(f"tandem bench report: error: {exc}", file=sys.stderr)
        return 2
    print(f"Report written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
