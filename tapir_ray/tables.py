"""Markdown tables and PNG plots for the run's and the evaluation's reports (tapir_ray.report,
tapir_ray.eval.report): one place, so neither report imports the other's helpers."""

from __future__ import annotations

from typing import Any

from tapir_ray import storage


def num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fs, path = storage.fs_and_path(out_dir)
    fs.makedirs(path, exist_ok=True)
    fig.tight_layout()
    with fs.open(f"{path}/{name}", "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return name
