"""Counts and histograms gathered while curating, and the report written from them.

`Stats` is what every worker fills and what runners merge: a Counter of keys
  read/<reason>             records and bad records of the readers
  in/<stage>                documents that reached a stage
  removed/<stage>/<reason>  documents a stage removed, by reason
  lines/<reason>            lines the C4 filter removed from kept documents
  pii/<kind>                replacements made
plus fixed-bin histograms (fixed bins make them mergeable across processes and runners)
and the input files skipped as unreadable (input.skip_bad_shards).
The report is report.json (kept/removed per stage and reason) and PNG histograms. Its counts
add up: records read = bad records + documents each stage removed + documents written
(`funnel_balance`); a report that does not is a bug, and `summary` refuses to make one.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np

from jaxllm.errors import RunError

STAGES = ("url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb",
          "classifier", "exact_dedup", "near_dedup")

HIST_BINS = {
    "words_input": np.concatenate(([0], np.logspace(0, 6, 25))),
    "words_output": np.concatenate(([0], np.logspace(0, 6, 25))),
    "language_score": np.linspace(0, 1, 21),
    "quality_score": np.linspace(0, 1, 21),
}


class Stats:
    def __init__(self):
        self.counts: Counter = Counter()
        self.hists = {k: np.zeros(len(v) - 1, np.int64) for k, v in HIST_BINS.items()}
        self.skipped: list[tuple[str, str]] = []   # (input file, why it could not be read)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, path: str, why: str) -> None:
        self.skipped.append((path, why))

    def observe(self, hist: str, value: float) -> None:
        edges = HIST_BINS[hist]
        i = int(np.searchsorted(edges, value, side="right")) - 1
        self.hists[hist][min(max(i, 0), len(edges) - 2)] += 1

    def merge(self, other: "Stats") -> "Stats":
        self.counts.update(other.counts)
        for k, v in other.hists.items():
            self.hists[k] += v
        self.skipped = sorted(self.skipped + other.skipped)
        return self

    @staticmethod
    def merged(parts) -> "Stats":
        out = Stats()
        for p in parts:
            out.merge(p)
        return out


def count_dedup(stats: Stats, n_in: int, n_exact: int, n_near: int, cfg) -> None:
    """Record the dedup stages as stages: documents in, documents removed."""
    if cfg.dedup.exact:
        stats.add("in/exact_dedup", n_in)
        stats.add("removed/exact_dedup/duplicate", n_exact)
    if cfg.dedup.minhash:
        stats.add("in/near_dedup", n_in - n_exact)
        stats.add("removed/near_dedup/duplicate", n_near)


def summary(stats: Stats, n_shards: int, output_docs: int, clusters: int) -> dict:
    c = stats.counts
    stages = []
    for st in STAGES:
        if f"in/{st}" not in c:
            continue
        removed = {k.split("/", 2)[2]: v for k, v in sorted(c.items()) if k.startswith(f"removed/{st}/")}
        n_in = c[f"in/{st}"]
        stages.append({"stage": st, "in": n_in, "removed": removed,
                       "kept": n_in - sum(removed.values())})
    read = {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("read/")}
    rep = {
        "input": {"shards": n_shards, "records": read.pop("records", 0), "bad_records": read,
                  "skipped_shards": [{"path": p, "error": why} for p, why in stats.skipped]},
        "stages": stages,
        "near_duplicate_clusters": clusters,
        "lines_removed": {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("lines/")},
        "pii_replaced": {k.split("/", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("pii/")},
        "output": {"docs": output_docs, "shards": n_shards},
        "histograms": {k: {"edges": HIST_BINS[k].tolist(), "counts": v.tolist()}
                       for k, v in stats.hists.items()},
    }
    if funnel_balance(rep) != 0:
        raise RunError(f"curation counts do not add up (records read - bad records - removed - "
                       f"written = {funnel_balance(rep)}): this is a bug in jaxllm curate, please "
                       f"report it with report data {json.dumps({k: rep[k] for k in ('input', 'stages', 'output')})}")
    return rep


def funnel_balance(rep: dict) -> int:
    """records read - bad records - documents removed by every stage - documents written:
    zero when every document is accounted for once."""
    removed = sum(sum(s["removed"].values()) for s in rep["stages"])
    return (rep["input"]["records"] - sum(rep["input"]["bad_records"].values())
            - removed - rep["output"]["docs"])


def write(out_dir: str, report: dict, histograms: bool, open_fn) -> list[str]:
    """Write report.json and, when asked, PNGs; returns the paths written."""
    paths = [f"{out_dir}/report.json"]
    with open_fn(paths[0], "wb") as f:
        f.write(json.dumps(report, indent=2, sort_keys=False).encode())
    if histograms:
        for name, png in _plots(report).items():
            path = f"{out_dir}/report_{name}.png"
            with open_fn(path, "wb") as f:
                f.write(png)
            paths.append(path)
    return paths


def stages_figure(report: dict, plt):
    """Horizontal stacked bars, kept and removed per stage; the legend sits to the right of
    the axes, where it cannot hide a bar."""
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, kept, removed = [], [], []
    for s in report["stages"]:
        labels.append(s["stage"])
        kept.append(s["kept"])
        removed.append(sum(s["removed"].values()))
    ax.barh(labels, kept, label="kept", color="tab:green")
    ax.barh(labels, removed, left=kept, label="removed", color="tab:red")
    ax.invert_yaxis()
    ax.set_xlabel("documents")
    ax.set_title("documents kept / removed per stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _plots(report: dict) -> dict[str, bytes]:
    import io

    import matplotlib
    matplotlib.use("Agg")   # no display on workers
    import matplotlib.pyplot as plt

    out = {"stages": _png(stages_figure(report, plt), plt, io)}
    for name, h in report["histograms"].items():
        edges, counts = np.array(h["edges"]), np.array(h["counts"])
        if counts.sum() == 0:
            continue   # a stage that was off (no classifier model, say)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.stairs(counts, edges, fill=True)
        if name.startswith("words"):
            ax.set_xscale("symlog", linthresh=1)
        ax.set_title(name.replace("_", " "))
        ax.set_ylabel("documents")
        out[name] = _png(fig, plt, io)
    return out


def _png(fig, plt, io) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
