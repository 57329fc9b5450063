"""The run layer's entry: which recipe a config names, its oracle endpoints (a local server
started when asked), and one driver running or resuming it under the run's lease.

    tapir_ray.recipe      the run layer both recipes stand on (Recipe)
    tapir_ray.rounds      TAPIR's recipe (TapirRun)
    tapir_ray.citing_run  CITING's recipe (CitingRun)
    tapir_ray.launch      this module: both recipes' common entry (the CLI and `tapir-ray eval`)
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import ray

from tapir_ray import storage
from tapir_ray.config import Config
from tapir_ray.curriculum.actor import read_state
from tapir_ray.lease import LeaseHeld, RunLease
from tapir_ray.recipe import RunError, StopAfter
from tapir_ray.rounds import TapirRun
from tapir_ray.rundir import RunDir
from tapir_ray.student import preload_engine

__all__ = ["RunError", "oracle_endpoints", "run", "runner_class"]


# --- the oracle endpoints of a run -----------------------------------------------------------------


class Endpoints(dict):
    """role → (EndpointConfig, base_url, cache identity). `wait()`, called before each request is
    sent, returns once a local server that is still starting answers."""

    def __init__(self, roles: dict, server=None, log: Callable[[str], None] = print):
        super().__init__(roles)
        self.server, self.log, self.started = server, log, time.perf_counter()

    def wait(self) -> None:
        if self.server is not None and not getattr(self.server, "ready", True):
            try:
                self.server.wait_ready()
            except RuntimeError as exc:  # exited or never answered: one line naming its log
                raise RunError(str(exc)) from None
            self.log(
                f"local oracle ready ({time.perf_counter() - self.started:.0f} s after its start)"
            )


@contextlib.contextmanager
def oracle_endpoints(cfg: Config, run_dir: str, log: Callable[[str], None]) -> Iterator[Endpoints]:
    """The run's Endpoints; starts the local server when asked (vLLM's in the background: the run
    ingests meanwhile, and the first request waits for it)."""
    from tapir_ray.oracle.local import LocalOracle, VLLMOracle

    roles = {"teacher": cfg.oracle.endpoint("teacher"), "judge": cfg.oracle.endpoint("judge")}
    missing = [r for r, ep in roles.items() if ep.base_url is None]
    server = None
    backend = cfg.oracle.local_server()
    if missing and not cfg.oracle.local:
        raise RunError(
            f"oracle.{missing[0]}.base_url is not set; set it, or set oracle.local: true to serve a local model"
        )
    try:
        if missing:
            storage.makedirs(RunDir(run_dir).logs)
            log(f"starting the local oracle ({backend}, {cfg.oracle.local_model}) ...")
            log_path = storage.join(run_dir, "logs", "oracle.log")
            if backend == "vllm":
                from tapir_ray.assets import resolve_model

                server = VLLMOracle(
                    resolve_model(cfg.oracle.local_model), max_num_seqs=cfg.oracle.local_max_batch,
                    max_model_len=cfg.oracle.local_max_model_len, port=cfg.oracle.local_port,
                    log_path=log_path,
                )  # fmt: skip
            else:
                args = ["--backend", backend, "--max-batch", str(cfg.oracle.local_max_batch)]
                if cfg.oracle.local_port:
                    args += ["--port", str(cfg.oracle.local_port)]
                if backend == "hf":
                    args += ["--model", cfg.oracle.local_model]
                server = LocalOracle(*args, startup_timeout=600, log_path=log_path)
            if backend == "vllm":
                server.start()
                log(f"local oracle starting at {server.base_url} (log: {log_path})")
            else:
                server.__enter__()
                log(f"local oracle listening at {server.base_url}")
        out = {}
        for role, ep in roles.items():
            if ep.base_url is None:
                # Both local servers continue a prefilled assistant turn (vLLM also constrains a
                # classification to its labels); the port changes between runs,
                # so the cache keys on a stable name instead of the URL.
                # It takes no key: none is sent to it.
                ep = ep.model_copy(update={"continue_final_message": True, "api_key_env": None,
                                           "structured_choice": backend == "vllm"})  # fmt: skip
                identity = f"local://{backend}/{cfg.oracle.local_model}"
                out[role] = (ep, server.base_url, identity)
            else:
                out[role] = (ep, ep.base_url, ep.base_url)
        yield Endpoints(out, server, log)
    finally:
        if server is not None:
            server.stop()


def runner_class(cfg: Config) -> type[TapirRun]:
    if cfg.curriculum.algorithm == "citing":
        from tapir_ray.citing_run import CitingRun

        return CitingRun
    return TapirRun


def run(
    cfg: Config, *, resume: bool | str = False, until: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """Run (or resume) the curriculum the config names; returns the final state.
    `resume="auto"` resumes when run.dir holds a run and starts one otherwise. `until` names a
    stage (`teacher`, `round-1/student`, as `tapir-ray status` lists them) after which the run
    stops, status `stopped`, for `--resume` to continue."""
    from tapir_ray.runtime import ensure_ray

    run_dir = storage.absolute(cfg.run.dir)
    state = read_state(run_dir)
    if (
        resume == "auto"
    ):  # a retried cluster job: continue a run that started, start one that did not
        resume = state is not None
    if state is not None and not resume:
        raise RunError(
            f"{run_dir} already holds a run (status {state['status']}); add --resume to continue it, or choose a new run.dir"
        )
    if state is None and resume:
        raise RunError(f"{run_dir}: no run to resume (no state.json)")
    if not cfg.oracle.local:
        endpoints = [("teacher", cfg.oracle.teacher), ("judge", cfg.oracle.judge)]
        for role, ep in endpoints:
            if ep is not None and ep.api_key_env and not os.environ.get(ep.api_key_env):
                raise RunError(
                    f"oracle.{role}.api_key_env: ${ep.api_key_env} is not set in this environment (on a cluster, set it on the head node, e.g. from a Kubernetes Secret)"
                )
    storage.makedirs(run_dir)
    try:
        lease = RunLease(run_dir).acquire()  # one driver per run, before anything is written
    except LeaseHeld as exc:
        raise RunError(str(exc)) from None
    storage.write_text_atomic(RunDir(run_dir).config, cfg.to_yaml())
    ensure_ray(cfg.resources)
    preload_engine(cfg.student)  # imported while the first stages run, not when the engine starts
    started = time.perf_counter()
    with (
        lease,
        oracle_endpoints(cfg, run_dir, log) as endpoints,
        runner_class(cfg)(cfg, run_dir, endpoints, log) as runner,
    ):
        runner.until = until
        try:
            state = runner.run()
        except StopAfter as stop:
            ray.get(runner.actor.finish.remote("stopped"))
            log(f"run stopped after stage {stop} (--until); continue it with --resume")
            return ray.get(runner.actor.get.remote())
        except BaseException:
            with contextlib.suppress(Exception):
                ray.get(runner.actor.finish.remote("failed"), timeout=10)
            raise
    from tapir_ray.report import write_report

    if until:
        log(f"--until {until}: the run has no stage of that name, and went to its end")
    text = write_report(run_dir)
    log(text)
    log(f"run finished in {time.perf_counter() - started:.0f} s; report: {RunDir(run_dir).report}")
    return state
