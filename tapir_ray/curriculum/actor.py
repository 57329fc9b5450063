"""The CurriculumActor: one named actor per run, the run's single source of truth.

It holds the round, the current stage, what every finished stage reported (rows in / out /
dead-lettered, seconds), and per round the α and size, the category targets and counts, the MFD
histogram, the hard and easy pools (as paths to Parquet in the run directory, never rows), the
adapter and its sha256, the training loss and the held-out NLL, plus the oracle ledger's snapshot.
Every change is written atomically to `<run>/state.json`; a new actor (after a crash, or on
`--resume`) starts from that file.
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import ray

from tapir_ray import storage
from tapir_ray.rundir import RunDir

STATE_VERSION = 1


def state_path(run_dir: str) -> str:
    return RunDir(run_dir).state


def read_state(run_dir: str) -> dict[str, Any] | None:
    path = state_path(run_dir)
    return storage.read_json(path) if storage.exists(path) else None


def empty_state(run_dir: str, algorithm: str, seed: int) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "run_dir": run_dir,
        "algorithm": algorithm,
        "seed": seed,
        "status": "running",
        "round": 0,
        "stage": None,
        "stage_started_at": None,
        "stages": {},
        "rounds": {},
        "ledger": {},
        "created_at": time.time(),
        "updated_at": time.time(),
    }


@ray.remote(num_cpus=0, max_restarts=-1)
class CurriculumActor:
    def __init__(self, run_dir: str, algorithm: str, seed: int, attach: bool = False):
        self.run_dir = run_dir
        self.state = read_state(run_dir) or empty_state(run_dir, algorithm, seed)
        if self.state["algorithm"] != algorithm or self.state["seed"] != seed:
            raise ValueError(
                f"{state_path(run_dir)}: the run was started with algorithm {self.state['algorithm']} and "
                f"seed {self.state['seed']}; the config asks for {algorithm} and seed {seed}"
            )
        if not attach:  # `tapir-ray eval` / `generate` read a finished run and leave its status be
            self.state["status"] = "running"
            self._persist()

    def _persist(self) -> None:
        self.state["updated_at"] = time.time()
        storage.write_json_atomic(state_path(self.run_dir), self.state)

    def get(self) -> dict[str, Any]:
        return copy.deepcopy(self.state)

    def stage_done(self, name: str) -> bool:
        return self.state["stages"].get(name, {}).get("status") == "done"

    def begin_stage(self, name: str, round_: int, total: int | None = None) -> None:
        self.state.update(round=round_, stage=name, stage_started_at=time.time())
        entry = self.state["stages"].setdefault(name, {})
        entry.update(status="running", round=round_, total=total)
        entry["attempts"] = entry.get("attempts", 0) + 1
        self._persist()

    def end_stage(self, name: str, info: dict[str, Any]) -> None:
        entry = self.state["stages"].setdefault(name, {})
        entry.update(info)
        entry["status"] = "done"
        entry["finished_at"] = time.time()
        self._persist()

    def update_round(self, round_: int, info: dict[str, Any]) -> None:
        self.state["rounds"].setdefault(str(round_), {}).update(info)
        self._persist()

    def set_ledger(self, snapshot: dict[str, Any]) -> None:
        self.state["ledger"] = snapshot
        self._persist()

    def finish(self, status: str) -> None:
        self.state["status"] = status
        self.state["stage"] = None
        self._persist()


class RunBusyError(RuntimeError):
    """The run's curriculum actor is alive: its driver is still running it."""


# Named actors are scoped by namespace and every driver gets an anonymous one by default: the
# run's actor lives in a fixed namespace so that another driver (a resumed run, `tapir-ray eval`)
# finds it by name.
NAMESPACE = "tapir-ray"


def _alive(name: str) -> bool:
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
        ray.get(actor.stage_done.remote(""), timeout=10)
    except Exception:  # no such actor, or one its crashed driver left behind that no longer answers
        return False
    return True


def curriculum_actor(
    run_dir: str, algorithm: str, seed: int, *, pin_to_head: bool = True, attach: bool = False
):
    """The run's actor, created fresh from `<run>/state.json` (a resumed run gets a new one).

    `attach=True` is for tools that read a run and add to it (evaluation, generation): the run's
    status is left as it is, and a run whose actor is alive — its driver still running it — is
    refused rather than taken over."""
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
    options: dict[str, Any] = {"name": f"tapir-curriculum-{digest}", "namespace": NAMESPACE}
    if attach and _alive(options["name"]):
        raise RunBusyError(
            f"{run_dir}: the run is still running (its curriculum actor answers); "
            "evaluate it or generate from it once it has finished or been stopped"
        )
    if pin_to_head:
        head = _head_node_id()
        if head is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=False)
    for _ in range(60):
        try:
            old = ray.get_actor(options["name"], namespace=NAMESPACE)
            ray.kill(
                old
            )  # an actor left by a crashed driver of the same run: state.json is the truth
        except ValueError:
            pass
        try:
            actor = CurriculumActor.options(**options).remote(run_dir, algorithm, seed, attach)
        except ValueError:  # the old actor still holds the name for a moment
            time.sleep(0.5)
            continue
        return actor
    raise RuntimeError(f"could not start the curriculum actor {options['name']}")


def _head_node_id() -> str | None:
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None
