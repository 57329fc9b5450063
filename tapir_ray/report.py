"""Per-round metrics and the run report: `<run>/metrics/round-<r>.json`, `report.md` and PNG plots.

Everything here is read back from the run directory (state.json, the stages' outputs, the oracle
ledger), so `tapir-ray report RUN` rebuilds the same report for a finished, running or crashed run.
"""

from __future__ import annotations

from typing import Any

from tapir_ray import storage
from tapir_ray.curriculum.actor import read_state
from tapir_ray.rundir import RunDir
from tapir_ray.tables import num as _num
from tapir_ray.tables import save_figure as _save
from tapir_ray.tables import table as _table

STAGE_ORDER = ("student_judge", "student_revise", "student", "judge", "scores", "plan", "expand", "plan_final", "refine", "train_set", "train", "nll")  # fmt: skip


def _round_stages(state: dict, r: int) -> list[tuple[str, dict]]:
    prefix = f"round-{r}/"
    found = [
        (k[len(prefix) :], v)
        for k, v in state["stages"].items()
        if k.startswith(prefix) and not k.endswith("_in")
    ]

    def order(item: tuple[str, dict]) -> tuple[int, str]:
        base = item[0].split("-")[0] if item[0].startswith("expand") else item[0]
        return (STAGE_ORDER.index(base) if base in STAGE_ORDER else 99, item[0])

    return sorted(found, key=order)


def _throughput(name: str, info: dict) -> dict[str, Any]:
    seconds = info.get("seconds") or 0
    rows = info.get("rows_out", info.get("rows"))
    out: dict[str, Any] = {"stage": name, "seconds": seconds, "rows_in": info.get("rows_in"),
                           "rows_out": rows, "dead_lettered": info.get("dead_lettered")}  # fmt: skip
    out["rows_per_s"] = round(rows / seconds, 2) if rows and seconds >= 1 else None
    if name == "student":
        out["tokens_per_s"] = info.get("generated_tokens_per_s")
    elif name in ("student_judge", "student_revise"):  # a streaming phase: its student's figures
        out["tokens_per_s"] = info.get("student", {}).get("generated_tokens_per_s")
    elif name == "train":
        out["tokens_per_s"] = info.get("tokens_per_s")
    if info.get("requests_per_s") is not None:
        out["requests_per_s"] = info["requests_per_s"]
    return out


def round_metrics(run_dir: str, r: int) -> dict[str, Any]:
    state = read_state(run_dir) or {}
    info = state.get("rounds", {}).get(str(r), {})
    ledger = state.get("ledger", {}).get("rounds", {}).get(str(r), {})
    plan, final = info.get("plan", {}), info.get("final", {})
    targets = plan.get("targets", {})
    counts = info.get("train_set", {}).get("counts", final.get("counts", {}))
    categories = {
        c: {"target": targets.get(c, 0), "trained": counts.get(c, 0)}
        for c in sorted(set(targets) | set(counts))
    }
    train = info.get("train", {})
    return {
        "round": r,
        "alpha": info.get("alpha"),
        "size": info.get("size"),
        "stages": [_throughput(n, i) for n, i in _round_stages(state, r)],
        "scores": {k: v for k, v in info.get("scores", {}).items() if k != "seconds"},
        "hard_share": info.get("hard_share"),
        "random_picks_judged": plan.get("judged"),
        "by_source": final.get("by_source", {}),
        "categories": categories,
        "oracle": ledger,
        "train": {k: train.get(k) for k in ("rows", "steps", "first_loss", "final_loss", "tokens_per_s", "adapter_sha256", "seconds")},
        "heldout_nll": info.get("nll"),
    }  # fmt: skip


def write_round_metrics(run_dir: str, r: int) -> dict[str, Any]:
    m = round_metrics(run_dir, r)
    storage.write_json_atomic(storage.join(run_dir, "metrics", f"round-{r}.json"), m)
    return m


def citing_table(state: dict[str, Any]) -> str:
    """CITING's per-round table: revisions trained on, how much the teacher changed, the loss, and
    the win / tie / lose rate against the SFT warm-up student per criterion (test split)."""
    rows: list[list[Any]] = []
    rounds = sorted(int(k) for k in state.get("rounds", {}))
    criteria = next((list(state["rounds"][str(r)].get("eval", {}).get("test", {})) for r in reversed(rounds)
                     if state["rounds"][str(r)].get("eval", {}).get("test")), [])  # fmt: skip
    for r in rounds:
        info = state["rounds"][str(r)]
        train = info.get("train", {})
        loss = (f"{train['first_loss']:.3f} → {train['final_loss']:.3f}"
                if train.get("first_loss") is not None and train.get("final_loss") is not None else None)  # fmt: skip
        test = info.get("eval", {}).get("test", {})
        cells = [f"{_num(test[c]['win_rate'])} ({test[c]['wins']}/{test[c]['ties']}/{test[c]['losses']})"
                 if test.get(c, {}).get("win_rate") is not None else None for c in criteria]  # fmt: skip
        rows.append([r if r else "0 (SFT warm-up)", train.get("rows"), info.get("mean_edit_distance"), loss,
                     info.get("eval", {}).get("t_inf"), *cells])  # fmt: skip
    header = ["round", "trained rows", "mean edit distance", "loss", "T_inf",
              *[f"{c} vs SFT (W/T/L)" for c in criteria]]  # fmt: skip
    return _table(header, rows)


def rubric_section(run_dir: str) -> list[str]:
    path = RunDir(run_dir).rubrics
    if not storage.exists(path):
        return []
    book = storage.read_json(path)
    parts = [f"## Question types and rubrics ({len(book['types'])} types, `rubrics.json`)", ""]
    for t in book["types"]:
        parts += [
            f"**{t['name']}** ({t['members']} curriculum question{'' if t['members'] == 1 else 's'}): {t['definition']}",
            "",
        ]
        parts += [f"{k}. {c}" for k, c in enumerate(t["criteria"], 1)] + [""]
    return parts


def summary_table(run_dir: str) -> str:
    """The one table printed at the end of a run: a row per round."""
    state = read_state(run_dir) or {}
    if state.get("algorithm") == "citing":
        return citing_table(state)
    rounds = sorted(int(r) for r in state.get("rounds", {}))
    rows = []
    for r in rounds:
        info = state["rounds"][str(r)]
        if r == 0 and not info.get("train"):
            continue  # no warm-up in this run
        ledger = state.get("ledger", {}).get("rounds", {}).get(str(r), {})
        train = info.get("train", {})
        by_source = info.get("final", {}).get("by_source", {})
        student = state["stages"].get(f"round-{r}/student_judge", {}).get("student") or state[
            "stages"
        ].get(f"round-{r}/student", {})
        loss = (f"{train['first_loss']:.3f} → {train['final_loss']:.3f}"
                if train.get("first_loss") is not None and train.get("final_loss") is not None else None)  # fmt: skip
        rows.append([
            r if r else "0 (prep + warm-up)", info.get("alpha"), train.get("rows"), info.get("hard_share"),
            by_source.get("expanded"), by_source.get("duplicate"), loss,
            info.get("nll") if r or info.get("nll") is not None else None,
            sum(e.get("requests", 0) for e in ledger.values()), sum(e.get("cache_hits", 0) for e in ledger.values()),
            round(sum(e.get("usd", 0.0) for e in ledger.values()), 4),
            student.get("generated_tokens_per_s"), train.get("tokens_per_s"),
        ])  # fmt: skip
    header = ["round", "α", "trained rows", "hard share", "expanded", "duplicated", "loss", "held-out NLL",
              "oracle requests", "cache hits", "USD", "student tok/s", "train tok/s"]  # fmt: skip
    base = state.get("rounds", {}).get("0", {}).get("nll_base")
    note = f"\nHeld-out NLL of the base student: {base:.4f}" if isinstance(base, float) else ""
    return _table(header, rows) + note


def _plots(run_dir: str, metrics: list[dict], delta: float | None = None) -> list[str]:
    """PNG plots next to report.md; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = RunDir(run_dir).metrics
    names = []
    scored = [m for m in metrics if m["scores"].get("mfd_histogram")]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        edges = sorted({float(b) for m in scored for b in m["scores"]["mfd_histogram"]})
        step = edges[1] - edges[0] if len(edges) > 1 else 1.0
        width = 0.8 * step / len(scored)
        used = [float(b) for m in scored for b, n in m["scores"]["mfd_histogram"].items() if n]
        for k, m in enumerate(scored):
            hist = m["scores"]["mfd_histogram"]
            xs = [float(b) + k * width for b in hist]
            ax.bar(xs, list(hist.values()), width=width, align="edge", label=f"round {m['round']}")
        if used:
            ax.set_xlim(min(used) - step, max(used) + 2 * step)
        if delta is not None:
            ax.axvline(
                delta,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"δ = {delta:g} (hard at or above)",
            )
        ax.set_xlabel("MFD = judge(teacher) − judge(student)")
        ax.set_ylabel("items")
        ax.set_title("Model Fitting Difficulty per round")
        ax.legend()
        names.append(_save(fig, out_dir, "mfd.png"))
    with_nll = [m for m in metrics if m.get("heldout_nll") is not None]
    if with_nll:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([m["round"] for m in with_nll], [m["heldout_nll"] for m in with_nll], marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out NLL (teacher answers)")
        ax.set_xticks([m["round"] for m in with_nll])
        names.append(_save(fig, out_dir, "nll.png"))
    curves = []
    for m in metrics:
        path = storage.join(run_dir, f"round-{m['round']}", "metrics.json")
        if storage.exists(path):
            steps = storage.read_json(path)
            curves.append((m["round"], [s["step"] for s in steps], [s["loss"] for s in steps]))
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3))
        for r, xs, ys in curves:
            ax.plot(xs, ys, label=f"round {r}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        names.append(_save(fig, out_dir, "loss.png"))
    last = next((m for m in reversed(metrics) if m["categories"]), None)
    if last:
        cats = [c for c, v in last["categories"].items() if v["target"] or v["trained"]]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        xs = range(len(cats))
        ax.bar(
            [x - 0.2 for x in xs],
            [last["categories"][c]["target"] for c in cats],
            width=0.4,
            label="target",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [last["categories"][c]["trained"] for c in cats],
            width=0.4,
            label="trained",
        )
        ax.set_xticks(list(xs), cats, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"Round {last['round']}: items per category")
        ax.legend()
        names.append(_save(fig, out_dir, "categories.png"))
    return names


def _delta(run_dir: str) -> float | None:
    import yaml

    path = RunDir(run_dir).config
    if not storage.exists(path):
        return None
    return yaml.safe_load(storage.read_text(path))["curriculum"]["tapir"]["delta"]


def write_report(run_dir: str) -> str:
    """Write metrics/round-*.json, report.md and the plots; return the summary table."""
    state = read_state(run_dir)
    if state is None:
        raise FileNotFoundError(f"{run_dir}: no state.json (not a tapir-ray run directory)")
    rounds = sorted(int(r) for r in state.get("rounds", {}) if int(r) > 0)
    metrics = [write_round_metrics(run_dir, r) for r in rounds]
    table = summary_table(run_dir)
    parts = [f"# Run report: {run_dir}", "", f"Status: **{state['status']}**, algorithm {state['algorithm']}, seed {state['seed']}.", "", table, ""]  # fmt: skip
    pre = [
        (n, i)
        for n, i in state["stages"].items()
        if not n.startswith("round-") and not n.endswith("_in")
    ]
    if state.get("algorithm") == "citing":
        retrieval = state["stages"].get("retrieval", {})
        parts += rubric_section(run_dir)
        if retrieval.get("retrieval_agreement") is not None:
            typed, by_teacher = (
                retrieval.get("typed", retrieval["typed_by_teacher"]),
                retrieval["typed_by_teacher"],
            )
            source = (
                "all typed by the teacher"
                if typed == by_teacher
                else (
                    f"{by_teacher} typed by the teacher, {typed - by_teacher} by the nearest type description"
                )
            )
            parts += [f"Rubric retrieval by type centroid agrees with the curriculum questions' types on "
                      f"{retrieval['retrieval_agreement']:.1%} of {typed} ({source}).", ""]  # fmt: skip
    if pre:
        parts += ["## Preparation", "", _table(["stage", "rows in", "rows out", "dead-lettered", "seconds"],
                  [[n, i.get("rows_in"), i.get("rows_out", i.get("items")), i.get("dead_lettered"), i.get("seconds")] for n, i in pre]), ""]  # fmt: skip
        labels = state["stages"].get("labels", {})
        if labels.get("classifier_agreement") is not None:
            parts += [f"Embedding classifier: agreement with the oracle on {labels['classifier_holdout_rows']} held-out labelled rows: {labels['classifier_agreement']:.1%}.", ""]  # fmt: skip
    for m in metrics:
        planned = m["alpha"] is not None or m["size"] is not None  # TAPIR's plan; CITING has none
        parts += [
            f"## Round {m['round']}" + (f" (α = {m['alpha']}, N = {m['size']})" if planned else ""),
            "",
        ]
        parts += [_table(["stage", "rows in", "rows out", "dead-lettered", "seconds", "rows/s", "tokens/s", "requests/s"],
                         [[s["stage"], s["rows_in"], s["rows_out"], s["dead_lettered"], s["seconds"], s["rows_per_s"],
                           s.get("tokens_per_s"), s.get("requests_per_s")] for s in m["stages"]]), ""]  # fmt: skip
        sc = m["scores"]
        if sc:
            parts += [f"Scored {sc.get('scored')} candidates ({sc.get('unscored')} unscored): mean judge score teacher "
                      f"{sc.get('mean_score_teacher')}, student {sc.get('mean_score_student')}; mean MFD {sc.get('mean_mfd')}; "
                      f"hard {sc.get('hard')} ({sc.get('hard_share')}). Training set by source: {m['by_source']}.", ""]  # fmt: skip
            if picks := m.get("random_picks_judged"):
                parts += [f"Selection random, judged all the same: the judge found {picks['hard']} of the "
                          f"{picks['scored']} scored random picks hard.", ""]  # fmt: skip
            judge = sc.get("judge") or {}
            if judge:
                parts += [f"Judge diagnostics: order consistency {_num(judge.get('order_consistency'))}, score spread "
                          f"{judge.get('score_spread')}, unreadable verdicts {_num(judge.get('parse_failures'))}, mean valid mass {_num(judge.get('mean_valid_mass'))}.", ""]  # fmt: skip
                parts += [
                    f"**Warning: the judge looks degenerate: {w}.**"
                    for w in judge.get("warnings", [])
                ]
                parts += [""] if judge.get("warnings") else []
            hist = {b: n for b, n in sc.get("mfd_histogram", {}).items() if n}
            if hist:
                parts += [
                    "MFD histogram (bin: items): "
                    + ", ".join(f"{b}: {n}" for b, n in hist.items()),
                    "",
                ]
        if m["oracle"]:
            parts += [_table(["role", "sent", "requests", "cache hits", "retries", "429s", "dead-lettered", "prompt tokens", "completion tokens", "USD", "p50 s"],
                             [[role, e.get("sent"), e.get("requests"), e.get("cache_hits"), e.get("retries"), e.get("rate_limited"),
                               e.get("dead_lettered"), e.get("prompt_tokens"), e.get("completion_tokens"), e.get("usd"), e.get("latency_p50_s")]
                              for role, e in sorted(m["oracle"].items())]), ""]  # fmt: skip
            if any(e.get("batch_requests") for e in m["oracle"].values()):
                parts += ["Online and through the provider's Batch API (`oracle.mode`):", "",
                          _table(["role", "online requests", "online USD", "batch requests", "batch USD", "saved by batching USD"],
                                 [[role, e.get("requests", 0) - e.get("batch_requests", 0), round(e.get("usd", 0.0) - e.get("batch_usd", 0.0), 6),
                                   e.get("batch_requests", 0), e.get("batch_usd", 0.0), e.get("batch_saved_usd", 0.0)]
                                  for role, e in sorted(m["oracle"].items())]), ""]  # fmt: skip
        cats = [
            [c, v["target"], v["trained"]]
            for c, v in m["categories"].items()
            if v["target"] or v["trained"]
        ]
        if cats and planned:
            parts += [_table(["category", "target", "trained"], cats), ""]
        elif cats:
            parts += [_table(["question type", "trained rows"], [[c, n] for c, _, n in cats]), ""]
        t = m["train"]
        nll = f"; held-out NLL {m['heldout_nll']}" if m["heldout_nll"] is not None else ""
        parts += [f"Training: {t.get('rows')} rows, {t.get('steps')} steps, loss {_num(t.get('first_loss'))} → {_num(t.get('final_loss'))}, "
                  f"{t.get('tokens_per_s')} tokens/s; adapter sha256 {str(t.get('adapter_sha256'))[:12]}…{nll}.", ""]  # fmt: skip
    try:
        plots = _plots(run_dir, metrics, _delta(run_dir))
    except ImportError:  # matplotlib is optional for the report
        plots = []
    parts += [f"![{p}]({p})" for p in plots]
    if storage.exists(storage.join(run_dir, "eval", "summary.json")):
        from tapir_ray.eval.report import eval_tables

        parts += ["", "## Evaluation (`tapir-ray eval`; plots in ../eval/)", "",
                  *eval_tables(storage.read_json(storage.join(run_dir, "eval", "summary.json")))]  # fmt: skip
    storage.write_text_atomic(RunDir(run_dir).report, "\n".join(parts) + "\n")
    return table


def status_text(run_dir: str) -> str:
    import time

    state = read_state(run_dir)
    if state is None:
        raise FileNotFoundError(f"{run_dir}: no state.json (not a tapir-ray run directory)")
    lines = [
        f"{run_dir}: {state['algorithm']} run, status {state['status']}, round {state['round']}"
    ]
    if state.get("stage"):
        since = time.time() - (state.get("stage_started_at") or time.time())
        total = state["stages"].get(state["stage"], {}).get("total")
        lines.append(
            f"current stage: {state['stage']} (for {since:.0f} s{f', {total} rows' if total else ''})"
        )
    done = [n for n, i in state["stages"].items() if i.get("status") == "done"]
    lines.append(f"stages done: {len(done)}; last: {done[-1] if done else '–'}")
    spent = state.get("ledger", {}).get("spent_usd")
    if spent is not None:
        lines.append(f"oracle spend: ${spent:.4f}")
    lines.append(summary_table(run_dir))
    return "\n".join(lines)
