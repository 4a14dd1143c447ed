"""Readable run outputs: the per-epoch PNG (loss and fold mAP) and the summary table."""

from __future__ import annotations

from pathlib import Path

from rayvid.core.atomic import atomic_path


def plot_history(results: list[dict], path: str | Path, title: str = "rayvid training") -> Path:
    """PNG with training loss and held-out fold mAP per epoch, one line per (fold, arch)."""
    import matplotlib

    matplotlib.use("Agg")  # headless; no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        hist = r.get("history") or []
        epochs = [h["epoch"] for h in hist]
        label = f"fold {r['fold']} {r['arch']}"
        ax_loss.plot(epochs, [h["loss"] for h in hist], marker="o", label=label)
        ax_map.plot(epochs, [h["fold_map"] for h in hist], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss", yscale="log")
    ax_map.set(xlabel="epoch", ylabel="fold mAP (official metric)", title="held-out fold mAP")
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
    ax_map.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def summary_lines(summary: dict) -> list[str]:
    """The end-of-run summary a person reads."""
    lines = [f"run folder        {summary['run_dir']}"]
    for r in summary["folds"]:
        lines.append(f"fold {r['fold']} {r['arch']:<10} best fold mAP {r['best_map']:.4f}  "
                     f"({r['seconds']:.0f} s)")
    ev = summary.get("eval") or {}
    where = ev.get("split", "val") + (f" ({ev['part']} part)" if ev.get("part") else "")
    if ev.get("map") is not None:
        lines.append(f"{where} mAP (ensemble of {summary['members']})   {ev['map']:.4f}"
                     + ("" if ev.get("honest", True) else "  (trained on: not an honest score)"))
    if summary.get("baseline_map") is not None:
        lines.append(f"{where} mAP (qFF class-mean baseline, no training)  "
                     f"{summary['baseline_map']:.4f}")
    for key in ("submission", "per_clip", "plot", "summary"):
        if summary.get(key):
            lines.append(f"{key:<17} {summary[key]}")
    return lines
