"""``layerpar plot``: test accuracy and loss of one or more runs, against epoch and wall time."""
from __future__ import annotations

import os
from typing import Sequence

from .config import ConfigError
from .metrics import read_jsonl

IMAGE_FORMATS = (".png", ".pdf", ".svg")

_PHASE_MARK = {"serial": "o", "parallel": "s"}


def load_run(run_dir: str) -> list[dict]:
    """The epoch records of a run; a ConfigError (one line) for a missing or empty run."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"plot: {run_dir}: no such run directory")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"plot: {run_dir}: no metrics.jsonl (is it a layerpar run directory?)")
    try:
        records = read_jsonl(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"plot: {path}: cannot read it: {str(e).splitlines()[0] if str(e) else e}") from None
    if not records:
        raise ConfigError(f"plot: {path}: no epochs recorded yet")
    return records


def plot_runs(run_dirs: Sequence[str], output: str, labels: Sequence[str] | None = None) -> None:
    """Write a 2x2 figure: test accuracy / test loss against epoch and against wall time.
    Parallel epochs are drawn with square markers, serial ones with circles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"plot: --labels gives {len(labels)} names for {len(run_dirs)} runs")
    if os.path.splitext(output)[1].lower() not in IMAGE_FORMATS:
        raise ConfigError(f"plot: -o {output}: unknown image format; use a name ending in "
                          f"{', '.join(IMAGE_FORMATS)}")
    runs = [load_run(d) for d in run_dirs]
    names = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for recs, name in zip(runs, names):
        ep = [r["epoch"] for r in recs]
        wall = [r["wall_time_s"] if r.get("wall_time_s") is not None else sum(q["epoch_time_s"] for q in recs[: i + 1])
                for i, r in enumerate(recs)]
        acc = [100 * r["test_acc"] for r in recs]
        loss = [r["test_loss"] for r in recs]
        for row, ys in ((0, acc), (1, loss)):
            for col, xs in ((0, ep), (1, wall)):
                ax = axes[row][col]
                (line,) = ax.plot(xs, ys, label=name)
                for phase, mark in _PHASE_MARK.items():
                    px = [x for x, r in zip(xs, recs) if r["phase"] == phase]
                    py = [y for y, r in zip(ys, recs) if r["phase"] == phase]
                    ax.plot(px, py, mark, color=line.get_color(), markersize=4)
    for col, xl in ((0, "epoch"), (1, "wall time (s)")):
        axes[0][col].set_ylabel("test accuracy (%)")
        axes[1][col].set_ylabel("test loss")
        for row in (0, 1):
            axes[row][col].set_xlabel(xl)
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("layerpar runs (circles: serial epochs, squares: parallel epochs)")
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
