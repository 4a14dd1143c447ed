"""What a sweep shows a person: the PNG of fold mAP against the searched values and the
summary printed at the end (matplotlib only, no Ray). `rayvid.tune.sweep` calls them once the
sweep's results table is built; see that module for the table's columns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from rayvid.core.atomic import atomic_path
from rayvid.tune.config import TuneJobConfig, is_number


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value (Tune hands configs back with numpy types)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _label(value: Any, width: int = 16) -> str:
    """Short text for a searched value: 4 significant digits, bands/mix as [0,20,30,40],
    loss stages as `start:weight name+...|...`, NaN (the code default None) as `default`."""
    if isinstance(value, str) and value[:1] in "[{":
        value = json.loads(value)
    if isinstance(value, float):
        text = "default" if math.isnan(value) else f"{value:.4g}"
    elif isinstance(value, list) and all(is_number(v) for v in value):
        text = "[" + ",".join(f"{v:g}" for v in value) + "]"
    elif isinstance(value, list) and all(isinstance(v, dict) and "weights" in v for v in value):
        text = "|".join(f"{st['start']:.2g}:" + "+".join(f"{w:g}{n}" for n, w in st["weights"].items())
                        for st in value)
    else:
        text = str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_sweep(cfg: TuneJobConfig, table: pd.DataFrame, curves: dict, path: Path) -> Path:
    """One PNG: fold mAP per epoch of every trial, then best fold mAP against each key
    (scatter for numbers, jittered strip for choices); x marks a trial ASHA stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    s, col, keys = cfg.search, f"best_{cfg.search.metric}", list(cfg.distributions)
    ncols = 4
    nrows = math.ceil((len(keys) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    axes = axes.ravel()
    for trial_id, hist in curves.items():
        axes[0].plot(hist["epoch"], hist[s.metric], marker=".", alpha=0.7)
    axes[0].set(title=f"{s.metric} per epoch", xlabel="epoch", ylabel=s.metric)
    axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    done = table[table[col].notna()] if len(table) else table
    rng = np.random.default_rng(0)
    for ax, key in zip(axes[1:], keys):
        vals, ys = list(done[key]) if len(done) else [], done[col].to_numpy() if len(done) else []
        if vals and all(is_number(v) or v is None or v != v for v in vals):  # NaN: default
            xs = np.asarray([np.nan if v is None else v for v in vals], float)
            ax.set_xscale("log" if cfg.distributions[key].kind == "loguniform" else "linear")
        else:
            cats = sorted({str(v) for v in vals})
            xs = np.array([cats.index(str(v)) for v in vals], float) + rng.uniform(-0.15, 0.15, len(vals))
            ax.set_xticks(range(len(cats)), [_label(c, 60).replace("|", "\n") for c in cats],
                          fontsize=6)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        for status, marker in (("TERMINATED", "o"), ("STOPPED_EARLY", "x")):
            m = (done["status"] == status).to_numpy() if len(done) else np.zeros(0, bool)
            ax.scatter(xs[m], np.asarray(ys)[m], marker=marker, label=status.lower())
        if len(done) and done["defaults"].any():
            m = done["defaults"].to_numpy()
            ax.scatter(xs[m], np.asarray(ys)[m], marker="*", s=160, c="red", label="defaults")
        ax.set(title=key, ylabel=col)
        ax.grid(alpha=0.3)
    if len(keys):
        axes[1].legend(fontsize=7)
    for ax in axes[len(keys) + 1:]:
        ax.set_visible(False)
    fig.suptitle(f"{cfg.name}: {len(table)} trials, fold {s.fold} {s.arch}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def summary_lines(summary: dict) -> list[str]:
    """What a person reads at the end: counts, the top trials with their values, the files."""
    m = summary["metric"]
    counts = ", ".join(f"{n} {k.lower()}" for k, n in summary["status"].items())
    lines = [f"sweep folder  {summary['out']}", f"trials        {summary['trials']} ({counts})",
             f"top {len(summary['top'])} by best {m} (fold {summary['fold']} {summary['arch']}):"]
    for i, row in enumerate(summary["top"], 1):
        score = row[f"best_{m}"]
        score = "   -  " if score is None or score != score else f"{score:.4f}"
        tag = "  [4th-place defaults]" if row["defaults"] else ""
        lines.append(f"{i}. {row['trial_id']}  {row['status']:<13} {m} {score}  "
                     f"epochs {row['epochs']}{tag}")
        lines.append("     " + "  ".join(f"{k}={_label(plain(row[k]), 60)}" for k in summary["keys"]))
    for e in summary["errors"]:
        lines.append(f"failed        {e['trial_id']}: {e['error']}")
    b, d = summary["best"], summary.get("defaults")
    lines.append(f"best          {b['trial_id']}  {m} {b[m]:.4f}")
    if d:
        lines.append(f"defaults      {d['trial_id']}  {m} {d[m]:.4f}  "
                     f"(best - defaults = {summary['gain_over_defaults']:+.4f})")
    for key in ("table", "plot", "best_yaml", "best_json"):
        lines.append(f"{key:<13} {summary[key]}")
    return lines
