"""``sparkctl``: validate specs, run pre-training and fine-tuning on Ray, fetch results from MLflow.

    sparkctl validate SPEC            report spec errors by field (any job kind)
    sparkctl pretrain SPEC            run locally (or on RAY_ADDRESS) with a live progress line
    sparkctl finetune SPEC            fine-tune with the paper's protocol (live progress line)
    sparkctl sweep SPEC               run an ablation sweep with a live table of trials
    sparkctl export RUN_ID OUT        download a run's timm-style encoder weights
    sparkctl schema [KIND|all]        print a job kind's spec JSON Schema (default pretrain)
    sparkctl ui                       browse the embedded MLflow store (mlflow ui)
    sparkctl --version                the installed version

Each job kind of orchestrator.kinds is a local verb (``sparkctl <kind> SPEC``).

Remote verbs (the REST service at SPARKORCH_API_URL, token in SPARKORCH_TOKEN):

    sparkctl submit SPEC [--wait]     submit a spec of any kind
    sparkctl submit SPEC --hold       store it HELD: it runs after `sparkctl release ID`
    sparkctl release ID               queue a held job
    sparkctl jobs                     list your jobs, newest first; filters: --state S
                                      (repeatable), --kind K, --name N; pages: --limit N,
                                      --cursor C (printed when there are more), --all
    sparkctl status ID [--wait]       one job, with its progress
    sparkctl logs ID [-f]             the job driver's log (follow with -f)
    sparkctl cancel ID                cancel a job
    sparkctl results ID               final metrics (sweeps: the results table)

Answers 429 and 503 are retried after their Retry-After (5 attempts within 60 s at most).

Token administration: the service's tokens file on this machine (SPARKORCH_API_TOKENS_FILE,
default $SPARKORCH_HOME/api-tokens.json); the running service sees changes within a second.

    sparkctl token create NAME        a new token for NAME, printed once (the file keeps its
                                      SHA-256 only); --replace for a NAME that has one
    sparkctl token list               the owners that have a token
    sparkctl token revoke NAME        remove NAME's token

``--json`` prints one machine-readable JSON document on stdout instead of text.
Exit codes: 0 done, 1 the job failed, 2 bad input, 130 cancelled.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from orchestrator.api_client import ApiError
from orchestrator.control.states import JOB_STATES, JOBS_PAGE_DEFAULT, JOBS_PAGE_MAX
from orchestrator.kinds import JOB_KINDS, JobKind, detect_kind, get_kind
from orchestrator.lifecycle import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED
from orchestrator.settings import (
    OrchestratorSettings,
    describe_settings_error,
    mlflow_run_route,
)
from orchestrator.specs import SpecError, read_spec_file
from orchestrator.tokens import issue_token, revoke_token, token_owners

__all__ = ["EXIT_BAD_INPUT", "EXIT_CANCELLED", "EXIT_FAILED", "build_parser", "main"]


def _emit(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    print(json.dumps(document, indent=2, default=str) if args.json else text)


def _spec_kind(args: argparse.Namespace, document: Any) -> JobKind:
    """``--kind`` when given, else the kind the document's keys say."""
    if getattr(args, "kind", None):
        return get_kind(args.kind)
    return detect_kind(document, source=str(args.spec))


def cmd_validate(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    document = read_spec_file(args.spec)
    kind = _spec_kind(args, document)
    spec = kind.parse(document, data_roots=settings.allowed_data_roots, source=str(args.spec))
    _emit(
        args,
        {
            "valid": True,
            "kind": kind.name,
            "spec": spec.model_dump(mode="json"),
            **kind.details(spec),
        },
        f"{args.spec}: valid {kind.describe(spec)}",
    )
    return 0


def run_link(settings: OrchestratorSettings, experiment_id: str, run_id: str) -> str:
    path = mlflow_run_route(experiment_id, run_id)
    if settings.mlflow_ui_url:
        return f"{settings.mlflow_ui_url.rstrip('/')}/{path}"
    if settings.mlflow_tracking_uri and settings.mlflow_tracking_uri.startswith("http"):
        return f"{settings.mlflow_tracking_uri.rstrip('/')}/{path}"
    return f"run `sparkctl ui`, then open http://127.0.0.1:5000/{path}"


class _LiveText:
    """Shows the latest text block on stderr: redrawn in place on a terminal, appended
    (only when it changed) otherwise."""

    def __init__(self) -> None:
        self.interactive = sys.stderr.isatty()
        self.last = ""

    def __call__(self, text: str) -> None:
        if text == self.last:
            return
        if self.interactive and self.last:
            lines = self.last.count("\n") + 1
            # Cursor to the start of the previous block, clear to the end of the screen.
            sys.stderr.write(f"\r\033[{lines - 1}F\033[J" if lines > 1 else "\r\033[K")
        elif self.last:
            sys.stderr.write("\n")
        sys.stderr.write(text)
        sys.stderr.flush()
        self.last = text

    def close(self) -> None:
        if self.last:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.last = ""


def _run_and_follow(
    args: argparse.Namespace, settings: OrchestratorSettings, kind: JobKind, spec: Any
) -> Any:
    """Run the job in-process with a live view; exits 130 on Ctrl-C / SIGTERM."""
    from orchestrator.lifecycle import JobCancelled, exit_after_cancel
    from orchestrator.progress import Poller
    from orchestrator.startup import StartupClock

    live = _LiveText()
    pollers: list[Poller] = []

    def follow(job_id: str, ref: Any) -> None:
        sys.stderr.write(f"{kind.name} job {job_id}: MLflow {kind.run_label} {ref.run_id}\n")
        if not args.json:
            pollers.append(Poller(kind.follow(spec, ref), live, interval=args.poll).start())

    try:
        startup = StartupClock.for_driver(None)  # from this process's start
        return kind.run(
            spec, job_id=args.job_id, settings=settings, on_run_open=follow, startup=startup
        )
    except (JobCancelled, KeyboardInterrupt):
        _stop(pollers, live)
        print(f"cancelled; the MLflow {kind.run_label} is marked KILLED", file=sys.stderr)
        exit_after_cancel(EXIT_CANCELLED)
    finally:
        _stop(pollers, live)


def _stop(pollers: list[Any], live: _LiveText) -> None:
    for poller in pollers:
        poller.stop()
    pollers.clear()
    live.close()


def _failed(args: argparse.Namespace, error: Exception) -> int:
    logging.getLogger(__name__).debug("job failed", exc_info=True)
    _emit(args, {"status": "FAILED", "error": str(error)}, f"FAILED: {error}")
    return EXIT_FAILED


def cmd_run(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    """``sparkctl <kind> SPEC``: run one job of that kind here, following it live."""
    kind = get_kind(args.command)
    spec = kind.load(args.spec, data_roots=settings.allowed_data_roots)
    try:
        result = _run_and_follow(args, settings, kind, spec)
    except Exception as error:  # reported; the MLflow run is already marked FAILED
        return _failed(args, error)
    link = run_link(settings, result.experiment_id, result.run_id)
    _emit(args, {**result.to_dict(), "mlflow_link": link}, kind.result_text(result, link))
    return 0


def _client(settings: OrchestratorSettings) -> Any:
    from orchestrator.api_client import ApiClient

    token = settings.token.get_secret_value() if settings.token else None
    return ApiClient(settings.api_url, token)


def _job_line(job: dict[str, Any]) -> str:
    message = f"  ({job['message']})" if job.get("message") else ""
    return f"{job['id']}  {job['kind']:<8}  {job['state']:<10}  {job['name']}{message}"


def cmd_submit(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    document = read_spec_file(args.spec)
    kind = _spec_kind(args, document)
    client = _client(settings)
    job = client.submit(kind.name, document, args.idempotency_key, hold=args.hold)
    if not args.wait:
        _emit(args, job, f"submitted {_job_line(job)}\n  {job['links']['self']}")
        return 0
    sys.stderr.write(f"submitted {_job_line(job)}\n")
    return _wait(args, client, job["id"])


def _wait(args: argparse.Namespace, client: Any, job_id: str) -> int:
    """Follow a job until it ends; the exit code says how it ended."""
    from orchestrator.control.states import TERMINAL_STATES
    from orchestrator.progress import Progress

    live = _LiveText()
    try:
        while True:
            job = client.job(job_id)
            if job["state"] in TERMINAL_STATES:
                break
            if not args.json:
                progress = client.progress(job_id)
                fields = {k: progress.get(k) for k in Progress.__dataclass_fields__}
                fields["status"] = job["state"]
                live(f"{job['state']}: {Progress(**fields).line()}")
            time.sleep(args.poll)
    except KeyboardInterrupt:
        live.close()
        print(f"stopped following; the job goes on (sparkctl cancel {job_id})", file=sys.stderr)
        return EXIT_CANCELLED
    live.close()
    _emit(args, job, _job_line(job))
    return {"SUCCEEDED": 0, "CANCELLED": EXIT_CANCELLED}.get(job["state"], EXIT_FAILED)


def cmd_jobs(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    client = _client(settings)
    filters = {"state": args.state or [], "kind": args.kind, "name": args.name}
    filters |= {"limit": args.limit, "cursor": args.cursor}
    if args.all:
        page = {"items": list(client.all_jobs(**filters)), "next_cursor": None}
    else:
        page = client.jobs(**filters)
    lines = [_job_line(job) for job in page["items"]] or ["(no jobs)"]
    if page.get("next_cursor"):
        lines.append(f"... more: {_next_page(args, page['next_cursor'])}")
    _emit(args, page, "\n".join(lines))
    return 0


def _next_page(args: argparse.Namespace, cursor: str) -> str:
    """The command that lists the next page: the same filters and limit, and ``cursor``."""
    words = ["sparkctl", "jobs"]
    for state in args.state or []:
        words += ["--state", state]
    for option in ("kind", "name"):
        if getattr(args, option):
            words += [f"--{option}", getattr(args, option)]
    if args.limit != JOBS_PAGE_DEFAULT:
        words += ["--limit", str(args.limit)]
    return shlex.join([*words, "--cursor", cursor])


def _page_size(text: str) -> int:
    """``--limit``: a whole number within the API's bounds."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= JOBS_PAGE_MAX:
        raise argparse.ArgumentTypeError(f"{value} is not within 1..{JOBS_PAGE_MAX}")
    return value


def cmd_status(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    client = _client(settings)
    if args.wait:
        return _wait(args, client, args.job_id)
    job = client.job(args.job_id)
    progress = client.progress(args.job_id)
    text = _job_line(job)
    if progress.get("step") is not None:
        text += f"\n  step {progress['step']}/{progress.get('total_steps')}"
        text += f"  loss {progress.get('loss')}"
    if job["links"].get("mlflow_run"):
        text += f"\n  MLflow: {job['links']['mlflow_run']}"
    _emit(args, {**job, "progress": progress}, text)
    return 0


def cmd_logs(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    client = _client(settings)
    if args.follow:
        try:
            for chunk in client.follow_logs(args.job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            return EXIT_CANCELLED
        return 0
    print("\n".join(client.logs(args.job_id, args.tail)))
    return 0


def cmd_cancel(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    job = _client(settings).cancel(args.job_id)
    _emit(args, job, f"cancel requested: {_job_line(job)}")
    return 0


def cmd_release(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    job = _client(settings).release(args.job_id)
    _emit(args, job, f"released: {_job_line(job)}")
    return 0


def cmd_token_create(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    path = settings.tokens_file
    token = issue_token(path, args.name, replace=args.replace)
    if not args.json:
        sys.stderr.write(f"token for {args.name}, shown this once ({path} keeps its SHA-256):\n")
    _emit(args, {"owner": args.name, "token": token, "tokens_file": str(path)}, token)
    return 0


def cmd_token_list(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    owners = token_owners(settings.tokens_file)
    document = {"owners": owners, "tokens_file": str(settings.tokens_file)}
    _emit(args, document, "\n".join(owners) or f"(no tokens in {settings.tokens_file})")
    return 0


def cmd_token_revoke(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    revoke_token(settings.tokens_file, args.name)
    text = f"revoked {args.name}'s token (the service refuses it within a second)"
    _emit(args, {"revoked": args.name, "tokens_file": str(settings.tokens_file)}, text)
    return 0


def cmd_results(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    from orchestrator.sweeps import to_markdown

    results = _client(settings).results(args.job_id)
    text = [f"{results['job_id']}: {results['state']}"]
    text += [f"  {k} {v:.4g}" for k, v in sorted(results.get("metrics", {}).items())]
    if results.get("rows"):
        text.append(to_markdown(results["columns"], results["rows"]))
    _emit(args, results, "\n".join(text))
    return 0


def cmd_export(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    from orchestrator.tracking import export_encoder_artifact

    path = export_encoder_artifact(settings.tracking_uri, args.run_id, Path(args.out))
    _emit(args, {"run_id": args.run_id, "path": str(path)}, f"wrote {path}")
    return 0


def cmd_schema(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    if args.kind == ALL_KINDS:
        schema = {name: kind.json_schema() for name, kind in JOB_KINDS.items()}
    else:
        schema = get_kind(args.kind).json_schema()
    print(json.dumps(schema, indent=2))
    return 0


ALL_KINDS = "all"


def cmd_ui(args: argparse.Namespace, settings: OrchestratorSettings) -> int:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (store {settings.tracking_uri})")
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparkctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a spec file of any job kind")
    validate.add_argument("spec", help="YAML or JSON spec (its kind is told by its keys)")
    _add_kind_option(validate)
    validate.set_defaults(run=cmd_validate)

    local = []
    for kind in JOB_KINDS.values():
        verb = sub.add_parser(kind.name, help=f"run {kind.summary} here")
        verb.add_argument("spec", help=f"YAML or JSON {kind.spec_type.__name__}")
        verb.add_argument("--job-id", help="resume/name the job (default: a new UUID)")
        verb.add_argument("--poll", type=float, default=kind.poll_s, help="seconds between updates")
        verb.set_defaults(run=cmd_run)
        local.append(verb)

    export = sub.add_parser("export", help="download a run's encoder weights")
    export.add_argument("run_id")
    export.add_argument("out", help="file to write, or an existing folder")
    export.set_defaults(run=cmd_export)

    schema = sub.add_parser("schema", help="print a job kind's spec JSON Schema")
    schema.add_argument(
        "kind",
        nargs="?",
        default=next(iter(JOB_KINDS)),
        choices=[*JOB_KINDS, ALL_KINDS],
        help=f"a job kind, or {ALL_KINDS} for {{kind: schema}} (default: %(default)s)",
    )
    schema.set_defaults(run=cmd_schema, json=True)

    ui = sub.add_parser("ui", help="serve the MLflow UI on the embedded store")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(run=cmd_ui)

    remote = _add_remote_verbs(sub)
    tokens = _add_token_verbs(sub)
    for command in (validate, *local, export, *remote, *tokens):
        command.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _add_remote_verbs(sub: Any) -> list[argparse.ArgumentParser]:
    submit = sub.add_parser("submit", help="submit a spec to the REST service")
    submit.add_argument("spec", help="YAML or JSON spec of any job kind")
    _add_kind_option(submit)
    submit.add_argument("--idempotency-key", help="resubmitting with the same key is safe")
    when = submit.add_mutually_exclusive_group()
    when.add_argument("--wait", action="store_true", help="follow the job until it ends")
    when.add_argument("--hold", action="store_true", help="store it HELD until released")
    submit.set_defaults(run=cmd_submit)

    release = sub.add_parser("release", help="queue a job submitted with --hold")
    release.add_argument("job_id")
    release.set_defaults(run=cmd_release)

    jobs = _add_jobs_verb(sub)

    status = sub.add_parser("status", help="one job and its progress")
    status.add_argument("job_id")
    status.add_argument("--wait", action="store_true", help="follow the job until it ends")
    status.set_defaults(run=cmd_status)

    logs = sub.add_parser("logs", help="the job driver's log")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--tail", type=int, default=200)
    logs.set_defaults(run=cmd_logs)

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=cmd_cancel)

    results = sub.add_parser("results", help="a job's final metrics / sweep table")
    results.add_argument("job_id")
    results.set_defaults(run=cmd_results)
    for command in (submit, status):
        command.add_argument("--poll", type=float, default=2.0, help="seconds between updates")
    return [submit, release, jobs, status, logs, cancel, results]


def _add_jobs_verb(sub: Any) -> argparse.ArgumentParser:
    jobs = sub.add_parser("jobs", help="list your jobs on the REST service, newest first")
    jobs.add_argument(
        "--state",
        action="append",
        choices=JOB_STATES,
        metavar="STATE",
        help=f"jobs in this state, repeatable: {', '.join(JOB_STATES)}",
    )
    jobs.add_argument("--kind", choices=list(JOB_KINDS))
    jobs.add_argument("--name", help="jobs of this spec name")
    jobs.add_argument(
        "--limit",
        type=_page_size,
        default=JOBS_PAGE_DEFAULT,
        help=f"jobs per page, 1..{JOBS_PAGE_MAX} (default: %(default)s)",
    )
    jobs.add_argument("--cursor", help="continue after a page (its next_cursor)")
    jobs.add_argument("--all", action="store_true", help="every page, not only the first")
    jobs.set_defaults(run=cmd_jobs)
    return jobs


def _add_token_verbs(sub: Any) -> list[argparse.ArgumentParser]:
    token = sub.add_parser(
        "token", help="create, list or revoke API tokens (the service's tokens file here)"
    )
    verbs = token.add_subparsers(dest="token_command", required=True)
    create = verbs.add_parser("create", help="a new token for NAME, printed once")
    create.add_argument("name", help="the owner the token authenticates as")
    create.add_argument("--replace", action="store_true", help="replace NAME's existing token")
    create.set_defaults(run=cmd_token_create)
    listing = verbs.add_parser("list", help="the owners that have a token")
    listing.set_defaults(run=cmd_token_list)
    revoke = verbs.add_parser("revoke", help="remove NAME's token")
    revoke.add_argument("name")
    revoke.set_defaults(run=cmd_token_revoke)
    return [create, listing, revoke]


# The distribution pyproject.toml's [project] name declares (tests/test_cli_remote.py checks).
DISTRIBUTION = "spark-orchestrator"


def package_version() -> str:
    """The installed distribution's version; else the source tree's, marked not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        return tomllib.loads(pyproject.read_text())["project"]["version"] + " (not installed)"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown (not installed)"


def _add_kind_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--kind", choices=list(JOB_KINDS), help="the spec's job kind (default: told by its keys)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = OrchestratorSettings()
    except (ValidationError, SettingsError) as error:
        problems = describe_settings_error(error)
        text = "\n".join(f"  {name}: {problem}" for name, problem in problems)
        _emit_error(args, problems, f"invalid settings in the environment:\n{text}")
        return EXIT_BAD_INPUT
    try:
        return args.run(args, settings)
    except SpecError as error:
        _emit_error(args, error.errors, str(error))
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as error:
        _emit_error(args, [("", str(error))], f"error: {error}")
        return EXIT_BAD_INPUT
    except ApiError as error:
        _emit_error(args, error.errors or [("", error.detail)], str(error))
        return EXIT_BAD_INPUT if 400 <= error.status < 500 else EXIT_FAILED


def _emit_error(args: argparse.Namespace, errors: list[tuple[str, str]], text: str) -> None:
    if getattr(args, "json", False):
        document: dict[str, Any] = {"errors": [{"field": f, "message": m} for f, m in errors]}
        if args.command == "validate":
            document = {"valid": False, **document}
        print(json.dumps(document, indent=2))
    else:
        print(text, file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
