"""The `tapir-ray` command line. Configuration lives in YAML files, not in flags.

tapir-ray config validate FILE     check a config; one line per problem
tapir-ray config show FILE         the resolved config, secrets redacted
tapir-ray ingest POOL... --out DIR [--config FILE]
tapir-ray doctor [--config FILE]   what this machine and cluster can run
tapir-ray run CONFIG [--resume]    run the curriculum (TAPIR): rounds of scoring, planning, training
tapir-ray status RUN               where a run stands
tapir-ray report RUN               metrics/report.md + plots; prints the per-round table
tapir-ray export RUN --round R [--merge] --out DIR
tapir-ray generate RUN --round R --input FILE [--self-revise N]   (CITING: answer, then self-revise)
tapir-ray eval RUN [--round R|base|all] [--suite alpaca|mtbench|nll|all] [--reference ...]
tapir-ray submit CONFIG --address http://HEAD:8265 [--follow]   run a config as a Ray job
tapir-ray submit --status JOB | --stop JOB --address ...
tapir-ray oracle serve ...         the OpenAI-compatible local teacher/judge
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tapir_ray.config import Config, ConfigError, load_config
from tapir_ray.rundir import RunDir


class UsageError(Exception):
    """A problem the user can fix, reported as one line without a traceback."""


def _load(path: str | None) -> Config:
    return load_config(path) if path else Config()


# --- config --------------------------------------------------------------------------------------


def cmd_config_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    algo = cfg.curriculum.algorithm
    from tapir_ray.chat import describe_template

    print(f"{args.file}: valid ({algo}, run dir {cfg.run.dir}, student {cfg.student.model})")
    print(f"chat template: {describe_template(cfg.student.chat_template)}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(load_config(args.file).to_yaml())
    return 0


# --- ingest --------------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    from tapir_ray.ingest import IngestError, ingest
    from tapir_ray.runtime import ensure_ray

    cfg = _load(args.config)
    pool = cfg.pool.model_copy(update={"paths": list(args.pool)})
    if args.limit is not None:
        pool = pool.model_copy(update={"limit": args.limit})
    ensure_ray(cfg.resources)
    try:
        summary = ingest(pool, args.out, block_rows=cfg.resources.ingest_batch_size)
    except IngestError as exc:
        raise UsageError(str(exc)) from None
    print(summary.table())
    return 0 if summary.reconciles else 1


# --- doctor --------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from tapir_ray.doctor import run_doctor

    cfg = _load(args.config)
    return run_doctor(cfg, check_endpoints=not args.no_endpoints)


# --- oracle ------------------------------------------------------------------------------------


def _range_ms(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return float(low), float(high or low)


def _server_key(name: str | None) -> str | None:
    if name is None:
        return None
    if not os.environ.get(name):
        raise UsageError(f"--api-key-env {name}: the variable is not set")
    return os.environ[name]


def cmd_oracle_serve(args: argparse.Namespace) -> int:
    from tapir_ray.oracle.server import Faults, Limits, OracleServer, serve

    if args.backend == "hf" and args.model is None:
        args.model = "bundled:smollm2-135m"
    server = OracleServer(
        args.backend,
        model_name=args.model_name,
        model_path=args.model,
        latency_ms=_range_ms(args.latency_ms),
        limits=Limits(rpm=args.rpm, tpm=args.tpm),
        faults=Faults(
            fail_rate=args.fail_rate, timeout_rate=args.timeout_rate, malformed_rate=args.malformed_rate,
            drop_rate=args.drop_rate, seed=args.seed,
        ),
        max_batch=args.max_batch,
        api_key=_server_key(args.api_key_env),
        batch_processing_s=args.batch_seconds,
        batch_window_s=args.batch_window_s,
    )  # fmt: skip
    serve(
        server,
        host=args.host,
        port=args.port,
        ready_file=args.ready_file,
        parent_pid=args.parent_pid,
    )
    return 0


# --- run, status, report ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from tapir_ray.launch import RunError, run
    from tapir_ray.oracle.ledger import BudgetExceeded

    cfg = load_config(args.config)
    try:
        run(cfg, resume="auto" if args.auto_resume else args.resume, until=args.until)
    except RunError as exc:
        raise UsageError(str(exc)) from None
    except BudgetExceeded as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tapir_ray.report import status_text

    try:
        print(status_text(args.run))
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tapir_ray.report import write_report

    try:
        print(write_report(args.run))
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    print(f"report: {RunDir(args.run).report}")
    return 0


# --- export ------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from tapir_ray import storage
    from tapir_ray.train import export_model

    adapter = RunDir(args.run).round(args.round).adapter
    if not storage.exists(storage.join(adapter, "adapter_config.json")):
        raise UsageError(f"{adapter}: no adapter for round {args.round} in this run")
    base = args.base_model
    if base is None:
        config_path = RunDir(args.run).config
        if not storage.exists(config_path):
            raise UsageError(f"{config_path}: missing; pass --base-model")
        import yaml

        base = yaml.safe_load(storage.read_text(config_path))["student"]["model"]
    out = export_model(adapter, args.out, base_model=base, merge=args.merge)
    print(f"{'merged model' if args.merge else 'adapter'} of round {args.round} written to {out}")
    return 0


# --- generate -------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from tapir_ray.curriculum import RunBusyError
    from tapir_ray.generate import GenerateError, generate

    try:
        out = generate(
            args.run,
            round_=args.round,
            input_path=args.input,
            self_revise=args.self_revise,
            out_path=args.out,
        )
    except (GenerateError, RunBusyError) as exc:
        raise UsageError(str(exc)) from None
    print(f"answers with every draft: {out}")
    return 0


# --- eval ----------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from tapir_ray.curriculum import RunBusyError
    from tapir_ray.eval.harness import SUITES, EvalError, evaluate

    suites = list(SUITES) if args.suite == "all" else [args.suite]
    try:
        evaluate(
            args.run, rounds=args.round, suites=suites, reference=args.reference, limit=args.limit
        )
    except (EvalError, RunBusyError) as exc:
        raise UsageError(str(exc)) from None
    print(
        f"results: {args.run.rstrip('/')}/eval/summary.json, report: {args.run.rstrip('/')}/eval/report.md"
    )
    return 0


# --- submit --------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    import shutil

    from tapir_ray import submit as jobs

    try:
        address = jobs.dashboard_address(args.address)
        if args.stop:
            stopped = jobs.stop(address, args.stop)
            print(f"job {args.stop}: {'stop requested' if stopped else 'not running'}")
            return 0
        if args.status:
            if args.follow:
                final = jobs.follow(address, args.status)
                print(f"job {args.status}: {final}")
                return 0 if final == "SUCCEEDED" else 1
            print(jobs.format_status(jobs.status(address, args.status)))
            return 0
        if not args.config:
            raise UsageError("submit: give a CONFIG to submit, or --status JOB / --stop JOB")
        cfg = load_config(args.config)
        spec = jobs.build_job(
            cfg, address=address, config_name=os.path.basename(args.config), run_dir=args.run_dir,
            code=args.code, pip=args.pip, submission_id=args.job_id,
            resume="auto" if args.auto_resume else args.resume, until=args.until,
        )  # fmt: skip
        try:
            job_id = jobs.submit(spec, address)
        finally:
            shutil.rmtree(spec.staging_dir, ignore_errors=True)
        print(f"submitted job {job_id} to {address}")
        print(f"run dir: {spec.metadata['tapir_ray.run_dir']}")
        if spec.secrets_by_name:
            print(f"keys the cluster must provide: {', '.join(spec.secrets_by_name)}")
        if not args.follow:
            print(f"follow it: tapir-ray submit --status {job_id} --follow --address {address}")
            return 0
        try:
            final = jobs.follow(address, job_id)
        except KeyboardInterrupt:
            print(
                f"\nstopped following; the job goes on (stop it: tapir-ray submit --stop {job_id})"
            )
            return 130
        print(f"job {job_id}: {final}")
        return 0 if final == "SUCCEEDED" else 1
    except jobs.SubmitError as exc:
        raise UsageError(str(exc)) from None


# --- entry point ---------------------------------------------------------------------------------


UNTIL_HELP = (
    "stop after this stage (e.g. teacher, round-1/student; `tapir-ray status` lists them) with "
    "status stopped; --resume continues"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapir-ray",
        description="Distil a teacher LLM into a student with TAPIR or CITING on Ray.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging; Ray's own logs and every worker's output on the console too",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="validate or show a config file")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = config_sub.add_parser("validate", help="check a config file; one line per problem")
    p.add_argument("file")
    p.set_defaults(func=cmd_config_validate)
    p = config_sub.add_parser(
        "show", help="print the resolved config (defaults filled in, secrets redacted)"
    )
    p.add_argument("file")
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser(
        "ingest", help="read pool files into canonical rows; prints reconciled counts"
    )
    p.add_argument(
        "pool",
        nargs="+",
        help="files or folders (JSON, JSONL, Parquet, CSV, saved HF dataset) or bundled:alpaca-5k",
    )
    p.add_argument("--out", required=True, help="output folder (local path or fsspec URL)")
    p.add_argument("--config", help="take pool.format, schema, columns, limits from this config")
    p.add_argument("--limit", type=int, help="read at most this many rows")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("run", help="run the curriculum a config describes (TAPIR or CITING)")
    p.add_argument("config")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in run.dir where it stopped"
    )
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume if run.dir holds a run, start one otherwise (for retried cluster jobs)",
    )
    p.add_argument("--until", metavar="STAGE", help=UNTIL_HELP)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="where a run stands: round, stage, progress, spend")
    p.add_argument("run", help="the run directory")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "report", help="write metrics/report.md and plots for a run; print its table"
    )
    p.add_argument("run", help="the run directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a round's adapter, or the base model with it merged")
    p.add_argument("run", help="the run directory")
    p.add_argument("--round", type=int, required=True)
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into the base model (a plain HF folder)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--base-model", help="default: student.model from the run's config.yaml")
    p.set_defaults(func=cmd_export)

    oracle = sub.add_parser("oracle", help="the OpenAI-compatible oracle server")
    oracle_sub = oracle.add_subparsers(dest="oracle_command", required=True, metavar="ACTION")
    p = oracle_sub.add_parser("serve", help="serve /v1/chat/completions on 127.0.0.1")
    p.add_argument(
        "--backend", choices=["hf", "scripted", "reference"], default="hf",
        help="hf: a local model; scripted: deterministic replies with limits and faults; "
        "reference: a perfect teacher, classifier, expander and judge for the programmatically "
        "checkable task families of tapir_ray.oracle.reference (scripted replies elsewhere)",
    )  # fmt: skip
    p.add_argument(
        "--model", help="hf backend: a model folder or bundled:smollm2-135m (the default)"
    )
    p.add_argument("--model-name", default="local", help="the model id clients ask for")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--ready-file", help="write the bound port here once listening")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument(
        "--max-batch", type=int, default=8, help="hf backend: requests generated together"
    )
    p.add_argument("--latency-ms", default="0", help="scripted: added latency, a value or LOW-HIGH")
    p.add_argument(
        "--rpm", type=int, help="enforce a requests-per-minute limit (429 + Retry-After)"
    )
    p.add_argument(
        "--tpm", type=int, help="enforce a tokens-per-minute limit (prompt estimate + max_tokens)"
    )
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered 500")
    p.add_argument(
        "--timeout-rate", type=float, default=0.0, help="share of requests never answered"
    )
    p.add_argument(
        "--malformed-rate", type=float, default=0.0, help="share answered 200 with a broken body"
    )
    p.add_argument("--drop-rate", type=float, default=0.0, help="share whose connection is dropped")
    p.add_argument("--seed", type=int, default=0, help="seeds the fault draws")
    p.add_argument(
        "--api-key-env", help="require the key in this environment variable (401 without it)"
    )
    p.add_argument(
        "--batch-seconds",
        type=float,
        default=0.0,
        help="Batch API: how long a batch's processing takes (its lines are spread over it)",
    )
    p.add_argument(
        "--batch-window-s",
        type=float,
        default=86_400.0,
        help="Batch API: the completion window in seconds; lines not done by then expire",
    )
    p.set_defaults(func=cmd_oracle_serve)

    p = sub.add_parser(
        "generate", help="CITING: answer questions, then self-revise with the retrieved rubric"
    )
    p.add_argument("run", help="the run directory (a CITING run)")
    p.add_argument("--round", type=int, required=True, help="the student S_R (0 = the SFT warm-up)")
    p.add_argument(
        "--input",
        required=True,
        help="JSON/JSONL rows with instruction (and input), or a text file",
    )
    p.add_argument(
        "--self-revise",
        type=int,
        default=None,
        help="revisions after the first answer (default: the T_inf the run chose on val)",
    )
    p.add_argument(
        "--out", help="the JSONL to write (default: <run>/generate/<time>/answers.jsonl)"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval", help="win rate, MT-Bench grades and held-out NLL of a run's students"
    )
    p.add_argument("run", help="the run directory")
    p.add_argument("--round", default="all", help="a trained round, base, or all (default)")
    p.add_argument("--suite", choices=["alpaca", "mtbench", "nll", "all"], default="all")
    p.add_argument(
        "--reference",
        help="alpaca: teacher (default), RUN:ROUND (that run's evaluated answers), or a JSON/JSONL file",
    )
    p.add_argument("--limit", type=int, help="evaluate at most this many prompts per suite")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "submit", help="run a config on a Ray cluster as a Ray job; follow, query or stop it"
    )
    p.add_argument("config", nargs="?", help="the config to run (omit with --status/--stop)")
    p.add_argument(
        "--address", help="the dashboard URL, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)"
    )
    p.add_argument("--follow", action="store_true", help="print the job's logs until it ends")
    p.add_argument("--resume", action="store_true", help="the job continues the run in run.dir")
    p.add_argument(
        "--auto-resume", action="store_true", help="the job resumes a run if there is one"
    )
    p.add_argument("--until", metavar="STAGE", help=UNTIL_HELP)
    p.add_argument("--run-dir", help="override run.dir (shared storage the cluster can write)")
    p.add_argument(
        "--code",
        choices=["installed", "local"],
        default="installed",
        help="installed: the cluster's tapir-ray (the image); local: ship this checkout's package",
    )
    p.add_argument("--pip", action="append", help="a pip requirement the job installs (repeatable)")
    p.add_argument("--job-id", help="the submission id (default: tapir-ray-RUN-TIMESTAMP)")
    p.add_argument("--status", metavar="JOB", help="show a job's status (with --follow: its logs)")
    p.add_argument("--stop", metavar="JOB", help="stop a job")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "doctor", help="report Ray, GPUs, student engines, bundled assets and endpoints"
    )
    p.add_argument("--config", help="also check this config's endpoints")
    p.add_argument("--no-endpoints", action="store_true", help="skip the endpoint checks")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our INFO lines reach the console; the libraries' only from warnings up (all with -v).
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("tapir_ray").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:  # vLLM's notices about the CPU build (Triton, ...) are not the user's
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    from tapir_ray.runtime import set_verbose

    set_verbose(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tapir-ray: {exc.source}: {problem}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"tapir-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tapir-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
