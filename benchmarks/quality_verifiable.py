"""Does the curriculum help? TAPIR against random selection on instructions a program can check.

    python benchmarks/quality_verifiable.py [--seeds 3] [--pool 240] [--test-per-family 20]
        [--arms tapir,random] [--round-sizes 48,80] [--warmup ROWS] [--levels 0-3] [--keep DIR]

For each seed: a pool and a held-out test set of the reference oracle's task families
(tapir_ray.oracle.reference: arithmetic, date arithmetic, sorting, reversal, counting, CSV→JSON,
code output; skewed so some are scarce); `tapir-ray oracle serve --backend reference` plays
teacher, classifier, expander and judge; every arm is the real TAPIR recipe (`tapir-ray run`) with
the bundled SmolLM2 student (vLLM where installed, LoRA under DeepSpeed) and the same round sizes,
so the arms train on the same number of rows:

- `tapir`: MFD selection with the α schedule, re-balancing and expansion;
- `random`: the same round sizes chosen at random (`curriculum.tapir.selection: random`);
- `tapir_no_rebalance`: MFD without the taxonomy's quotas (one flat category);
- `random_judged`: the random arm's picks, with the student and judge run all the same
  (`judge_random: true`), so that it spends the oracle requests TAPIR spends.

`--levels 0-3` (the default) includes the families' easy level (reference.LEVELS), which the base
student partly answers, so the judge has easy candidates to tell from hard ones; with `--levels 1-3`
nearly every candidate is hard for the bundled 135M student and MFD's split has little to choose.

With `--warmup ROWS`, every arm first fine-tunes the student on the same seeded slice of ROWS pool
items (TAPIR's optional round 0), so that the judge measures difficulty on a student that has seen
each family; the training rows reported include the warm-up's.

Each arm's last-round student answers the test set; a program checks the answers (exact match
per family). Reported per arm: accuracy (overall, per family and per level), oracle requests,
training rows;
and the TAPIR − random difference in accuracy with a 95 % bootstrap interval over test items and
seeds. Results: benchmarks/results/quality_verifiable.json (or --out) and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray
import yaml
from common import command_line, device_name, print_table, write_results

from tapir_ray.oracle.local import LocalOracle
from tapir_ray.oracle.reference import FAMILIES, family_of, is_correct, make_split
from tapir_ray.runtime import ensure_ray

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "quality_verifiable.json"
ARMS = ("tapir", "random", "tapir_no_rebalance", "random_judged")


def arm_config(arm: str, run_dir: Path, pool: Path, base_url: str, seed: int, args) -> dict:
    sizes = [int(x) for x in args.round_sizes.split(",")]
    tapir = {
        "rounds": len(sizes), "round_sizes": sizes, "alpha": [0.3, 0.5, 0.7][: len(sizes)],
        "warmup": args.warmup > 0, "warmup_rows": max(1, args.warmup), "heldout_fraction": 0.02, "nll_max_rows": 16, "expansion_attempts": 1,
        "expansion_max_tokens": 96, "delta": 1.0, "selection": "random" if arm.startswith("random") else "mfd",
        "judge_random": arm == "random_judged",
        "judge": {"mode": "single", "logprob_scoring": True},
        # A family's instances share one template and differ in their numbers and words: to a
        # sentence encoder they are all near-duplicates at the default 0.92.
        "near_duplicate_threshold": 0.995,
    }  # fmt: skip
    if arm == "tapir_no_rebalance":
        tapir["taxonomy"] = {"Others": 1.0}
    return {
        "run": {"dir": str(run_dir), "seed": seed},
        "pool": {"paths": [str(pool)]},
        "student": {"model": "bundled:smollm2-135m", "engine": "auto", "max_model_len": 512,
                    "sampling": {"temperature": 0.0, "max_tokens": args.max_tokens}, "batch_size": 32,
                    "gpus_per_replica": 0},
        "oracle": {"teacher": {"base_url": base_url, "model": "local", "api_key_env": None, "rpm": 100_000,
                               "tpm": 10**8, "max_concurrency": 16, "continue_final_message": True},
                   "actors": 1, "teacher_max_tokens": 128},
        "curriculum": {"algorithm": "tapir", "tapir": tapir},
        "train": {"deepspeed_stage": 2, "num_workers": 2, "use_gpu": False, "micro_batch_size": 4,
                  "global_batch_size": 8, "epochs": args.epochs, "max_length": 256, "lr": 1e-3},
        "resources": {"num_cpus": 2},
    }  # fmt: skip


def answer_test(run_dir: Path, test: list[dict], args) -> list[str]:
    """The arm's last-round student answers the test prompts (None: the base student)."""
    from tapir_ray.config import StudentConfig
    from tapir_ray.curriculum import read_state
    from tapir_ray.student import Adapter, run_student

    adapter = None
    if run_dir is not None:
        state = read_state(str(run_dir))
        last = max(int(r) for r, info in state["rounds"].items() if info.get("adapter_sha256"))
        adapter = Adapter.load(f"round-{last}", str(run_dir / f"round-{last}" / "adapter"))
    student = StudentConfig(model="bundled:smollm2-135m", engine="auto", max_model_len=512, batch_size=32,
                            gpus_per_replica=0, sampling={"temperature": 0.0, "max_tokens": args.max_tokens})  # fmt: skip
    rows = [{"id": r["id"], "messages": json.dumps([{"role": "user", "content": r["instruction"]}])}
            for r in test]  # fmt: skip
    out = Path(tempfile.mkdtemp(prefix="quality-answers-"))
    run_student(
        ray.data.from_items(rows), student, str(out), run_dir=str(out), round_=0, adapter=adapter
    )
    got = {r["id"]: r["response"] for r in ray.data.read_parquet(str(out)).take_all()}
    return [got[r["id"]] for r in test]


def ledger_requests(run_dir: Path) -> dict[str, int]:
    """The run's oracle requests by role (teacher, judge, classify, expand, refine, ...)."""
    state = json.loads((run_dir / "state.json").read_text())
    by_role: Counter = Counter()
    for per in state.get("ledger", {}).get("rounds", {}).values():
        for role, e in per.items():
            by_role[role] += int(e.get("requests", 0))
    return dict(sorted(by_role.items()))


def selection_by_family(run_dir: Path) -> dict[str, dict[str, int]]:
    """Why an arm trained on what it did, per family over the run's rounds: the candidates the
    judge scored (`scored`) and those it found hard (MFD ≥ δ), and the training rows by where the
    plan took them (`hard`, `easy`, `random`, `expanded`, `duplicate`)."""
    from tapir_ray import storage
    from tapir_ray.rundir import RunDir

    run = RunDir(str(run_dir))
    rounds = sorted(int(r) for r in json.loads((run_dir / "state.json").read_text())["rounds"])
    texts: dict[str, str] = {}
    for folder in [run.items, *(run.round(r).expanded for r in rounds)]:
        if storage.exists(folder):
            t = storage.read_table(folder, ["id", "instruction"])
            texts.update(zip(t["id"].to_pylist(), t["instruction"].to_pylist(), strict=True))

    def family(item_id: str) -> str:
        found = family_of(texts.get(item_id, ""))
        return found[0].name if found else "other"

    out: dict[str, Counter] = {}
    for r in rounds:
        rd = run.round(r)
        if storage.exists(rd.scores):
            scores = storage.read_table(rd.scores, ["id", "hard"])
            for item_id, hard in zip(
                scores["id"].to_pylist(), scores["hard"].to_pylist(), strict=True
            ):
                counts = out.setdefault(family(item_id), Counter())
                counts["scored"] += 1
                counts["scored_hard"] += bool(hard)
        plan = storage.read_table(rd.plan_final, ["id", "source"])
        for item_id, source in zip(plan["id"].to_pylist(), plan["source"].to_pylist(), strict=True):
            out.setdefault(family(item_id), Counter())[f"trained_{source}"] += 1
    return {f: dict(sorted(c.items())) for f, c in sorted(out.items())}


def random_picks_judged(run_dir: Path) -> dict[str, int] | None:
    """A judged random arm's picks over the run's rounds: how many the judge scored, and found hard."""
    state = json.loads((run_dir / "state.json").read_text())
    got = [r.get("plan", {}).get("judged") for r in state["rounds"].values()]
    got = [g for g in got if g]
    return {k: sum(g[k] for g in got) for k in ("scored", "hard")} if got else None


def train_rows(run_dir: Path) -> int:
    state = json.loads((run_dir / "state.json").read_text())
    return sum(int(s.get("rows") or 0) for k, s in state["stages"].items() if k.endswith("/train"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=240)
    parser.add_argument("--test-per-family", type=int, default=20)
    parser.add_argument("--arms", default="tapir,random")
    parser.add_argument("--round-sizes", default="48,80")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, default=0, metavar="ROWS",
        help="a warm-up fine-tune on ROWS pool items before round 1, the same for every arm (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--levels", default="0-3", help="difficulty levels LOW-HIGH (0: the easy one, see --help)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--keep", default=None, help="keep the runs under DIR")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    assert set(arms) <= set(ARMS), f"arms are {', '.join(ARMS)}"
    work = Path(args.keep or tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    correct: dict[str, list[np.ndarray]] = {a: [] for a in ["base", *arms]}
    per_family: dict[str, dict[str, list[bool]]] = {a: {f: [] for f in FAMILIES} for a in correct}
    per_level: dict[str, dict[int, list[bool]]] = {a: {} for a in correct}
    levels = tuple(int(x) for x in args.levels.split("-"))
    spend: dict[str, list[dict[str, int]]] = {a: [] for a in arms}
    rows: dict[str, list[int]] = {a: [] for a in arms}
    chosen: dict[str, list[dict]] = {a: [] for a in arms}
    judged: dict[str, list[dict | None]] = {a: [] for a in arms}
    started = time.perf_counter()
    ensure_ray()  # one cluster: the runs attach to it, as a Ray Job's driver would
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with LocalOracle("--backend", "reference") as server:
        for seed in range(args.seeds):
            pool, test = make_split(seed, args.pool, args.test_per_family, levels=levels)
            pool_path = work / f"seed-{seed}" / "pool.jsonl"
            pool_path.parent.mkdir(parents=True, exist_ok=True)
            pool_path.write_text("".join(json.dumps({k: r[k] for k in ("id", "instruction", "input", "output")}) + "\n"
                                         for r in pool))  # fmt: skip
            for arm in ["base", *arms]:
                run_dir = None if arm == "base" else work / f"seed-{seed}" / arm
                if run_dir is not None:
                    cfg = work / f"seed-{seed}" / f"{arm}.yaml"
                    cfg.write_text(
                        yaml.safe_dump(
                            arm_config(arm, run_dir, pool_path, server.base_url, seed, args)
                        )
                    )
                    state = run_dir / "state.json"
                    finished = (
                        state.exists() and json.loads(state.read_text()).get("status") == "done"
                    )
                    # With --keep, a rerun reuses the arms that finished and resumes the others.
                    resume = ["--resume"] if state.exists() and not finished else []
                    done = subprocess.run(
                        [sys.executable, "-m", "tapir_ray.cli", "run", str(cfg), *resume], cwd=REPO, env=env
                    ) if not finished else subprocess.CompletedProcess([], 0)  # fmt: skip
                    if done.returncode != 0:
                        sys.exit(
                            f"the {arm} run of seed {seed} failed ({done.returncode}): {run_dir}"
                        )
                    spend[arm].append(ledger_requests(run_dir))
                    rows[arm].append(train_rows(run_dir))
                    chosen[arm].append(selection_by_family(run_dir))
                    judged[arm].append(random_picks_judged(run_dir))
                saved = work / f"seed-{seed}" / f"{arm}-answers.json"
                if saved.exists():  # with --keep, an arm's test answers are given once
                    answers = json.loads(saved.read_text())
                else:
                    answers = answer_test(run_dir, test, args)
                    saved.write_text(json.dumps(answers))
                ok = np.array(
                    [is_correct(r["instruction"], a) for r, a in zip(test, answers, strict=True)]
                )
                correct[arm].append(ok)
                for r, hit in zip(test, ok, strict=True):
                    per_family[arm][r["family"]].append(bool(hit))
                    per_level[arm].setdefault(r["level"], []).append(bool(hit))
                print(f"seed {seed} {arm}: accuracy {ok.mean():.3f}", flush=True)
            # Written after every seed: a long benchmark that stops keeps what it measured.
            report = summarise(args, arms, correct, per_family, per_level, spend, rows, chosen,
                               judged, started)  # fmt: skip
            write_results(Path(args.out), report)
            plot(report, Path(args.out).with_suffix(".png"))
    print_table(["arm", "accuracy", *FAMILIES],
                [[a, v["accuracy"], *(v["by_family"].get(f, "") for f in FAMILIES)] for a, v in report["arms"].items()])  # fmt: skip
    lv = sorted({k for v in report["arms"].values() for k in v["by_level"]})
    print_table(["arm", *(f"level {k}" for k in lv)],
                [[a, *(v["by_level"].get(k, "") for k in lv)] for a, v in report["arms"].items()])  # fmt: skip
    # What each arm's judge found hard, and what each family trained on.
    for arm, v in report["arms"].items():
        if sel := v.get("selection_by_family"):
            took = sorted({k for c in sel.values() for k in c if k.startswith("trained_")})
            print_table([f"{arm}: family", "judged", "judged hard", *(k.replace("_", " ") for k in took)],
                        [[f, c.get("scored", 0), c.get("scored_hard", 0), *(c.get(k, 0) for k in took)]
                         for f, c in sel.items()])  # fmt: skip
    for key, label in (("tapir_minus_random", "random"),
                       ("tapir_minus_no_rebalance", "TAPIR without re-balancing")):  # fmt: skip
        if key in report:
            print(f"TAPIR − {label}:", report[key])


def summarise(args, arms: list[str], correct: dict, per_family: dict, per_level: dict,
              spend: dict, rows: dict, chosen: dict, judged: dict, started: float) -> dict:  # fmt: skip
    report = {
        "benchmark": "quality_verifiable",
        "command": command_line("quality_verifiable.py", args),
        "device": device_name(),
        "seconds": round(time.perf_counter() - started, 1),
        "seeds": len(correct["base"]),
        "pool": args.pool,
        "round_sizes": [int(x) for x in args.round_sizes.split(",")],
        "warmup_rows": args.warmup,
        "test_per_family": args.test_per_family,
        "levels": args.levels,
        "arms": {
            arm: {
                "accuracy": round(float(np.concatenate(correct[arm]).mean()), 4),
                "accuracy_by_seed": [round(float(c.mean()), 4) for c in correct[arm]],
                # Each test item right (1) or not, in make_split's order: an arm run later, on the
                # same seeds and test sets, is compared with this one item by item.
                "correct_by_seed": ["".join("1" if x else "0" for x in c) for c in correct[arm]],
                "by_family": {
                    f: round(float(np.mean(v)), 4) for f, v in per_family[arm].items() if v
                },
                "by_level": {
                    str(k): round(float(np.mean(v)), 4) for k, v in sorted(per_level[arm].items())
                },
                # Per seed: all requests, and by role (where the arms' spend differs).
                "oracle_requests": [sum(s.values()) for s in spend[arm]] if arm in spend else None,
                "oracle_requests_by_role": spend.get(arm),
                "train_rows": rows.get(arm),
                # Summed over the seeds: what the judge found hard and what each family trained on.
                "selection_by_family": _summed(chosen.get(arm) or []) or None,
                # Per seed, a judged random arm's picks: how many the judge scored and found hard.
                "random_picks_judged": judged.get(arm) if any(judged.get(arm) or []) else None,
            }
            for arm in correct
            if correct[arm]
        },
    }
    for other, key in (("random", "tapir_minus_random"),
                       ("tapir_no_rebalance", "tapir_minus_no_rebalance")):  # fmt: skip
        if {"tapir", other} <= set(arms) and (diff := _paired(correct["tapir"], correct[other])):
            report[key] = diff
    return report


def _summed(per_seed: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    total: dict[str, Counter] = {}
    for seed in per_seed:
        for family, counts in seed.items():
            total.setdefault(family, Counter()).update(counts)
    return {f: dict(sorted(c.items())) for f, c in sorted(total.items())}


def _paired(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict | None:
    """The mean accuracy difference over the seeds both arms finished, paired by test item within
    each seed, with a 95 % bootstrap interval that resamples items (and so seeds)."""
    done = min(len(ours), len(theirs))
    if not done:
        return None
    diff = np.concatenate(
        [t.astype(float) - r for t, r in zip(ours[:done], theirs[:done], strict=True)]
    )
    draws = np.random.default_rng(0).integers(0, len(diff), size=(4000, len(diff)))
    means = diff[draws].mean(axis=1)
    return {"mean": round(float(diff.mean()), 4), "ci_low": round(float(np.quantile(means, 0.025)), 4),
            "ci_high": round(float(np.quantile(means, 0.975)), 4)}  # fmt: skip


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    names = list(FAMILIES) + ["overall"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        vals = [report["arms"][arm]["by_family"].get(f, 0.0) for f in FAMILIES] + [
            report["arms"][arm]["accuracy"]
        ]
        ax.bar(np.arange(len(names)) + k * width, vals, width, label=arm)
    ax.set_xticks(np.arange(len(names)) + width * (len(arms) - 1) / 2, names, rotation=20)
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"TAPIR vs random selection ({report['seeds']} seeds, levels {report.get('levels', '1-3')})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
