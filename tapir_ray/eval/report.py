"""`<run>/eval/report.md`: the evaluation tables and a plot of each metric over the targets."""

from __future__ import annotations

from typing import Any

from tapir_ray import storage
from tapir_ray.tables import num as _num
from tapir_ray.tables import save_figure as _save
from tapir_ray.tables import table as _table


def _order(targets: dict[str, Any]) -> list[str]:
    return sorted(targets, key=lambda t: -1 if t == "base" else int(t.split("-")[1]))


def _section(
    title: str, header: list[str], rows: list[list[Any]], excluded: list | None, what: str
) -> list[str]:
    parts = [f"### {title}", "", _table(header, rows), ""]
    if excluded:
        parts += [f"Excluded as seen in training: {len(excluded)} {what}.", ""]
    return parts


def eval_tables(summary: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    if alpaca := summary.get("alpaca"):
        t = alpaca["targets"]
        parts += _section(
            f"Pairwise win rate against {alpaca['reference']} ({alpaca['prompts']} prompts, both orders)",
            ["student", "win rate", "95 % CI", "LC win rate", "wins / ties / losses (judgments)", "mean chars student / ref", "unjudged"],
            [[n, _num(t[n]["win_rate"]), f"{_num(t[n]['ci_low'])} – {_num(t[n]['ci_high'])}", _num(t[n]["lc_win_rate"]),
              f"{t[n]['wins']} / {t[n]['ties']} / {t[n]['losses']}",
              f"{t[n]['mean_len_student']:.0f} / {t[n]['mean_len_reference']:.0f}", t[n]["unjudged"]] for n in _order(t)],
            alpaca.get("excluded_contaminated"), "prompts",
        )  # fmt: skip
        health = {n: t[n]["judge"] for n in _order(t) if t[n].get("judge")}
        if health:
            parts += _section(
                "Judge diagnostics (win rate)", ["student", "order consistency", "unreadable verdicts", "warnings"],
                [[n, _num(h["order_consistency"]), _num(h["parse_failures"]), "; ".join(h["warnings"]) or "–"]
                 for n, h in health.items()], None, "",
            )  # fmt: skip
    if mt := summary.get("mtbench"):
        t = mt["targets"]
        cats = sorted({c for n in t for c in t[n]["categories"]})
        parts += _section(
            f"MT-Bench ({mt['questions']} questions, two turns, single-answer grading 1–10)",
            ["student", "score", "turn 1", "turn 2", "graded", *cats],
            [[n, _num(t[n]["score"]), _num(t[n]["turn_1"]), _num(t[n]["turn_2"]), f"{t[n]['graded']}/{t[n]['asked']}",
              *[_num(t[n]["categories"].get(c)) for c in cats]] for n in _order(t)],
            mt.get("excluded_contaminated"), "questions",
        )  # fmt: skip
    if nll := summary.get("nll"):
        t = nll["targets"]
        parts += _section(
            "Held-out NLL of the teacher's answers", ["student", "NLL", "rows", "tokens"],
            [[n, _num(t[n].get("nll")), t[n].get("rows"), t[n].get("tokens")] for n in _order(t)], None, "",
        )  # fmt: skip
    return parts


def _plots(run_dir: str, summary: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, names = storage.join(run_dir, "eval"), []
    alpaca = summary.get("alpaca", {}).get("targets")
    if alpaca and len(alpaca) > 0:
        order = _order(alpaca)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        wr = [alpaca[n]["win_rate"] for n in order]
        err = [[w - alpaca[n]["ci_low"] for w, n in zip(wr, order, strict=True)],
               [alpaca[n]["ci_high"] - w for w, n in zip(wr, order, strict=True)]]  # fmt: skip
        ax.errorbar(order, wr, yerr=err, marker="o", capsize=4, label="win rate (95 % CI)")
        lc = [alpaca[n]["lc_win_rate"] for n in order]
        if all(v is not None for v in lc):
            ax.plot(order, lc, marker="s", linestyle="--", label="length-controlled")
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set_ylim(0, 1), ax.set_ylabel("win rate vs reference"), ax.legend(fontsize=8)
        names.append(_save(fig, out, "winrate.png"))
    lines = (  # file, targets, (key, label) series, y label, y limits
        ("mtbench.png", summary.get("mtbench", {}).get("targets"),
         (("score", "overall"), ("turn_1", "turn 1"), ("turn_2", "turn 2")), "MT-Bench grade", (1, 10)),
        ("nll.png", summary.get("nll", {}).get("targets"), (("nll", "held-out NLL"),),
         "held-out NLL (teacher answers)", None),
    )  # fmt: skip
    for name, targets, series, ylabel, ylim in lines:
        if not targets:
            continue
        order = _order(targets)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key, label in series:
            ax.plot(order, [targets[n].get(key) for n in order], marker="o", label=label)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_ylabel(ylabel), ax.legend(fontsize=8)
        names.append(_save(fig, out, name))
    return names


def write_eval_report(run_dir: str) -> str:
    """Write eval/report.md and its plots; return the tables as text."""
    path = storage.join(run_dir, "eval", "summary.json")
    if not storage.exists(path):
        return ""
    summary = storage.read_json(path)
    tables = eval_tables(summary)
    plots = _plots(run_dir, summary)
    text = (
        "\n".join([f"# Evaluation: {run_dir}", "", *tables, *[f"![{p}]({p})" for p in plots]])
        + "\n"
    )
    storage.write_text_atomic(storage.join(run_dir, "eval", "report.md"), text)
    return "\n".join(tables)
