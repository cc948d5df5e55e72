"""The ``hostqueue`` command line: run a supervisor, control it, submit and inspect jobs.

Exit codes: 0 success, 1 the job or operation failed, 2 usage error, 3 cannot reach
the supervisor. Every command that prints data takes ``--json``.
"""

from __future__ import annotations

import importlib.metadata
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click
import orjson

from hostqueue.core import settings
from hostqueue.client.sync import FINAL_EVENTS, Client, Job
from hostqueue.cli.display import (
    ProgressLine,
    format_bar,  # noqa: F401  (hostqueue.demo imports it from here)
    format_event,
    format_job,
    format_jobs,
    format_paused,
    format_progress,
    format_schedules,
    format_stats,
    format_status,
    shown_status,
)
from hostqueue.core.errors import ProtocolError, SupervisorUnavailable
from hostqueue.core.states import ALL_STATES, JobStatus

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

RETRYABLE_STATES = ("failed", "cancelled", "expired")

F = TypeVar("F", bound=Callable[..., Any])


def _version() -> str:
    import hostqueue

    version = getattr(hostqueue, "__version__", None)
    if version:
        return str(version)
    try:  # slower: reads the installed distributions
        return importlib.metadata.version("hostqueue")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------
# output (the text for people comes from hostqueue.display)


def print_json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


# ---------------------------------------------------------------------------
# plumbing


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"hostqueue: {message}", err=True)
    raise click.exceptions.Exit(code)


class _Root(click.Group):
    """Turns the client's errors into the documented exit codes, with one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SupervisorUnavailable as exc:
            _fail(str(exc), EXIT_UNAVAILABLE)
        except ProtocolError as exc:
            # forbidden: the supervisor is there but will not serve us; for the
            # caller that is the same as not reaching it.
            _fail(f"{exc.code}: {exc.message}",
                  EXIT_UNAVAILABLE if exc.code == "forbidden" else EXIT_FAILED)
        except TimeoutError as exc:
            _fail(str(exc) or "timed out", EXIT_FAILED)


def _emit(data: Any, as_json: bool, text: Callable[[], str]) -> None:
    """The reply's data as JSON, or as text for people."""
    if as_json:
        print_json(data)
    else:
        click.echo(text())


def _client(socket: str | None) -> Client:
    """A connected client, closed when the command ends."""
    return click.get_current_context().with_resource(Client(socket))


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON (the reply's data) instead of text.")(f)


def socket_option(f: F) -> F:
    return click.option("--socket", metavar="PATH", help="Control socket "
                        "[env: HOSTQUEUE_SOCKET; default: next to the store].")(f)


def _follow(client: Client, job_id: int, timeout: float | None, show_progress: bool) -> Job:
    """Wait for the job to end, drawing its progress on stderr when asked (from the
    watch stream: no polling)."""
    if not show_progress:
        return client.wait(job_id, timeout)
    line = ProgressLine(sys.stderr)
    deadline = None if timeout is None else time.monotonic() + timeout
    fraction: float | None = None
    message = ""
    state = "pending"
    try:
        with client.watch(job_id=job_id) as stream:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                event = stream.next_event(remaining) if remaining is None or remaining > 0 else None
                if event is None and stream.ended:  # a final event without its job
                    return client.get(job_id)
                if event is None:
                    raise TimeoutError(f"job {job_id} did not end within {timeout} s")
                kind = event.get("event")
                job = event.get("job")
                if kind == "progress":
                    fraction, message = event.get("progress"), event.get("message") or ""
                    state = "running"  # its `started` may have come before we watched
                elif isinstance(job, Mapping):
                    state = shown_status(job)
                    if kind in FINAL_EVENTS:
                        return dict(job)
                line.show(format_progress(job_id, state, fraction, message))
    finally:
        line.clear()


def _finish(client: Client, job: Job, as_json: bool) -> NoReturn:
    # For people, `get` adds what the end-of-job reply leaves out (the attempt log).
    _emit(job, as_json, lambda: format_job(client.get(job["id"])))
    completed = job.get("status") == JobStatus.COMPLETED.value
    raise click.exceptions.Exit(0 if completed else EXIT_FAILED)


def _interrupted(job_id: int) -> NoReturn:
    _fail(f"stopped waiting; job {job_id} goes on (`hostqueue job wait {job_id}`)", 130)


# ---------------------------------------------------------------------------
# commands


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(_version(), "--version", prog_name="hostqueue")
def cli() -> None:
    """hostqueue: a durable job queue for one host.

    One supervisor process keeps the jobs in one SQLite file and runs them in worker
    processes; clients talk to it over a Unix socket. Try `hostqueue demo`.
    """


def _setting_options(f: F) -> F:
    """The options of `run`, from the settings table (which also names the env vars and
    the configuration file's keys)."""
    metavars = {"store": "PATH", "socket": "PATH", "tasks": "MODULE", "max_line": "BYTES"}
    choices = {"durability": ("normal", "full"), "log_level": ("debug", "info", "warning", "error"),
               "log_format": ("text", "json")}
    for s in reversed(settings.SETTINGS):
        text = "How much to log" if s.name == "log_level" else s.help[0].upper() + s.help[1:]
        if s.type is list:
            text += "; repeat the option for several"
        where = [f"env: {s.env}"]
        if getattr(s, "toml", ""):
            where.append(f"file: {s.toml}")
        if s.default not in (None, ()):
            where.append(f"default: {s.default}")
        kwargs: dict[str, Any] = {"help": f"{text} [{'; '.join(where)}]."}
        if s.name in choices:
            kwargs["type"] = click.Choice(choices[s.name], case_sensitive=False)
        else:
            kwargs["type"] = {int: int, float: float}.get(s.type, str)
            kwargs["metavar"] = metavars.get(s.name) or {int: "N", float: "SECONDS"}.get(s.type, "VALUE")
        kwargs["multiple"] = s.type is list
        f = click.option("--" + s.name.replace("_", "-"), s.name, **kwargs)(f)
    return click.option("--config", metavar="PATH", help="TOML configuration file; flags and "
                        "env vars override it [env: HOSTQUEUE_CONFIG].")(f)


@cli.command()
@_setting_options
@click.pass_context
def run(ctx: click.Context, /, **flags: Any) -> None:
    """Run the supervisor in the foreground (until SIGTERM, SIGINT or `ctl stop`).

    \b
    Examples:
        hostqueue run --store /var/lib/hostqueue/jobs.db --workers 4 --tasks myapp.tasks
        hostqueue run --config /etc/hostqueue.toml
    """
    try:
        config = settings.from_environment(**flags)
    except settings.SettingsError as exc:
        click.echo(f"hostqueue run: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    # Imported here so that the client-side commands never load the server's modules.
    from hostqueue.supervisor.main import run_supervisor

    ctx.exit(run_supervisor(config))


@cli.command()
@click.argument("task")
@click.argument("args_json", required=False, metavar="[ARGS_JSON]")
@socket_option
@click.option("--queue", metavar="Q", help="Queue (default: the task's).")
@click.option("--priority", type=int, metavar="P", help="Higher runs first (default: the task's).")
@click.option("--delay", type=click.FloatRange(min=0), metavar="S",
              help="Start no sooner than S seconds from now.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Expire if not started within S seconds.")
@click.option("--retries", type=click.IntRange(min=0), metavar="N",
              help="Retries after the first attempt.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Time limit of one attempt, in seconds.")
@click.option("--key", metavar="K",
              help="Idempotency key: an unfinished job with it is returned instead.")
@click.option("--key-ttl", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="With --key: a job with it that completed within S seconds answers instead.")
@click.option("--run-id", metavar="R", help="Group the job into a run.")
@click.option("--wait", is_flag=True, help="Wait for the job to end (progress bar on a "
              "terminal) and print it; exit 1 unless it completed.")
@json_option
def submit(task: str, args_json: str | None, socket: str | None, queue: str | None,
           priority: int | None, delay: float | None, deadline: float | None,
           retries: int | None, timeout: float | None, key: str | None, key_ttl: float | None,
           run_id: str | None, wait: bool, as_json: bool) -> None:
    """Submit a job: TASK with ARGS_JSON (a JSON object of its arguments; '-' reads stdin).

    Prints the job's id, or with --wait the finished job.

    \b
    Examples:
        hostqueue submit thumbnails.resize '{"path": "a.png", "width": 64}'
        hostqueue submit reports.build --delay 3600 --key nightly
        hostqueue submit hostqueue.demo_tasks.sleep '{"seconds": 2}' --wait
    """
    args = _parse_args(args_json)
    client = _client(socket)
    handle = client.submit(task, args, queue=queue, priority=priority, delay=delay,
                           deadline=deadline, retries=retries, timeout=timeout, key=key,
                           run_id=run_id, key_ttl=key_ttl)
    if handle.duplicate:
        click.echo(f"hostqueue: job {handle.id} ({handle.job.get('status')}) has the key "
                   f"{key!r}; it was returned and nothing was added", err=True)
    if not wait:
        _emit(handle.job, as_json, lambda: str(handle.id))
        return
    try:
        job = _follow(client, handle.id, None, show_progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        _interrupted(handle.id)
    _finish(client, job, as_json)


def _parse_args(args_json: str | None) -> dict[str, Any] | None:
    if args_json is None:
        return None
    text = sys.stdin.read() if args_json == "-" else args_json
    try:
        args = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param_hint="ARGS_JSON") from None
    if not isinstance(args, dict):
        raise click.BadParameter(
            f"must be a JSON object of keyword arguments, like '{{\"path\": \"a.png\"}}', "
            f"not {type(args).__name__ if args is not None else 'null'}",
            param_hint="ARGS_JSON",
        )
    return args


# -- ctl


@cli.group()
@socket_option
@click.pass_context
def ctl(ctx: click.Context, socket: str | None) -> None:
    """Control a running supervisor: status, stats, scaling, pausing, reload, stop, watch,
    top, metrics.

    \b
    Example:
        hostqueue ctl --socket /run/hostqueue/hostqueue.sock status
    """
    ctx.obj = socket


@ctl.command()
@json_option
@click.pass_obj
def status(socket: str | None, as_json: bool) -> None:
    """Show the supervisor and its workers.

    \b
    Example:
        hostqueue ctl status --json | jq '.workers[].pid'
    """
    st = _client(socket).status()
    _emit(st, as_json, lambda: format_status(st))


@cli.group()
@socket_option
@click.pass_context
def schedule(ctx: click.Context, socket: str | None) -> None:
    """Recurring schedules (cron) the supervisor runs.

    \b
    Example:
        hostqueue schedule list
    """
    ctx.obj = socket


@schedule.command("list")
@json_option
@click.pass_obj
def schedule_list(socket: str | None, as_json: bool) -> None:
    """List schedules with their cron expression, last and next run.

    \b
    Example:
        hostqueue schedule list --json | jq '.[].next_run'
    """
    data = _client(socket).request("schedules")["schedules"]
    _emit(data, as_json, lambda: format_schedules(data))


@ctl.command()
@click.option("--run-id", metavar="R", help="Count only the jobs of this run.")
@json_option
@click.pass_obj
def stats(socket: str | None, run_id: str | None, as_json: bool) -> None:
    """Count jobs by state, in all and per queue.

    \b
    Example:
        hostqueue ctl stats --run-id batch-7
    """
    data = _client(socket).stats(run_id)
    _emit(data, as_json, lambda: format_stats(data))


@ctl.command()
@click.argument("n", type=click.IntRange(0, settings.MAX_WORKERS))
@json_option
@click.pass_obj
def scale(socket: str | None, n: int, as_json: bool) -> None:
    """Set the number of worker processes to N (retiring workers finish their job first).

    \b
    Example:
        hostqueue ctl scale 8
    """
    data = _client(socket).scale(n)
    _emit(data, as_json, lambda: f"workers: {data.get('previous')} -> {data.get('target')}")


def _show_paused(paused: list[str], as_json: bool) -> None:
    _emit(paused, as_json, lambda: format_paused(paused))


@ctl.command()
@click.argument("queue", required=False)
@json_option
@click.pass_obj
def pause(socket: str | None, queue: str | None, as_json: bool) -> None:
    """Start no new job from QUEUE (every queue if none is named); running jobs go on.

    \b
    Example:
        hostqueue ctl pause thumbnails
    """
    _show_paused(_client(socket).pause(queue), as_json)


@ctl.command()
@click.argument("queue", required=False)
@json_option
@click.pass_obj
def resume(socket: str | None, queue: str | None, as_json: bool) -> None:
    """Start jobs from QUEUE again (every queue if none is named).

    \b
    Example:
        hostqueue ctl resume thumbnails
    """
    _show_paused(_client(socket).resume(queue), as_json)


@ctl.command()
@json_option
@click.pass_obj
def reload(socket: str | None, as_json: bool) -> None:
    """Re-import the task modules and replace every worker (running jobs finish first).

    \b
    Example:
        hostqueue ctl reload
    """
    data = _client(socket).reload()
    if as_json:
        print_json(data)
    else:
        tasks = data.get("tasks") or []
        click.echo(f"reloaded: {data.get('workers')} workers, "
                   f"{len(tasks)} tasks: {', '.join(tasks)}")


@ctl.command()
@click.option("--fast", is_flag=True, help="Stop workers now and put their jobs back to pending.")
@json_option
@click.pass_obj
def stop(socket: str | None, fast: bool, as_json: bool) -> None:
    """Stop the supervisor: drain (running jobs get the grace period) or --fast.

    \b
    Example:
        hostqueue ctl stop
    """
    data = _client(socket).stop(fast)
    if as_json:
        print_json(data)
    elif data.get("mode") == "fast":
        click.echo("stopping now; running jobs go back to pending")
    else:
        click.echo("draining: no new job starts; the supervisor exits when running jobs end")


@ctl.command()
@click.option("--job", "job_id", type=int, metavar="ID", help="Only this job (ends with it).")
@click.option("--queue", metavar="Q", help="Only jobs of this queue.")
@click.option("--task", metavar="T", help="Only jobs of this task.")
@click.option("--run-id", metavar="R", help="Only jobs of this run.")
@json_option
@click.pass_obj
def watch(socket: str | None, job_id: int | None, queue: str | None, task: str | None,
          run_id: str | None, as_json: bool) -> None:
    """Print job events as they happen, one line each (JSON lines with --json), until Ctrl-C.

    \b
    Examples:
        hostqueue ctl watch --queue thumbnails
        hostqueue ctl watch --job 17 --json
    """
    client = _client(socket)
    tasks: dict[Any, str] = {}

    def task_of(job: int) -> str:
        try:
            return str(client.get(job).get("task") or "")
        except ProtocolError:
            return ""

    try:
        for event in client.watch(job_id=job_id, queue=queue, task=task, run_id=run_id):
            click.echo(orjson.dumps(event).decode() if as_json
                       else format_event(event, tasks, task_of))
    except KeyboardInterrupt:
        pass  # the usual way to end a watch


@ctl.command()
@click.option("--once", is_flag=True, help="Print one frame as plain text and exit (for scripts): "
              "the frame after one interval of events, so rates and ETAs are measured.")
@click.option("--interval", type=click.FloatRange(min=0), default=1.0, show_default=True,
              metavar="S", help="Seconds between refreshes of status and queue counts "
              "(with --once: seconds of events to measure; 0 prints at once).")
@json_option
@click.pass_obj
def top(socket: str | None, once: bool, interval: float, as_json: bool) -> None:
    """A live view of the supervisor, like htop: workers with their job's progress, ETA,
    CPU and memory, queue depths and throughput. Keys: q (or Ctrl-C) quits, space refreshes.

    \b
    Examples:
        hostqueue ctl top
        hostqueue ctl top --once --interval 2
    """
    from hostqueue.cli import top as top_view

    if once or as_json:
        model = top_view.run_once(socket, interval)
        if as_json:
            print_json(model.snapshot())
        else:
            click.echo(top_view.plain(top_view.render(model, socket=Client(socket).socket_path)))
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise click.UsageError("the live view needs a terminal; use --once (or --json) in scripts")
    click.get_current_context().exit(top_view.run_live(socket, max(0.1, interval)))


@ctl.command()
@json_option
@click.pass_obj
def metrics(socket: str | None, as_json: bool) -> None:
    """Print the supervisor's metrics in Prometheus text format (what --metrics-port
    serves over HTTP); with --json, one object per sample.

    \b
    Examples:
        hostqueue ctl metrics
        hostqueue ctl metrics | grep '^hostqueue_jobs{'
    """
    text = _client(socket).request("metrics")["metrics"]
    if as_json:
        print_json(parse_prometheus(text))
    else:
        click.echo(text, nl=not text.endswith("\n"))


def parse_prometheus(text: str) -> list[dict[str, Any]]:
    """Samples of Prometheus text format: ``[{"name", "labels": {..}, "value"}]``."""
    samples = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: dict[str, str] = {}
        rest = rest.rstrip("}")
        while rest:
            key, _, rest = rest.partition('="')
            chars = []
            i = 0
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                    chars.append({"n": "\n"}.get(rest[i], rest[i]))
                else:
                    chars.append(rest[i])
                i += 1
            labels[key.strip(", ")] = "".join(chars)
            rest = rest[i + 1:].lstrip(",")
        samples.append({"name": name, "labels": labels, "value": float(value)})
    return samples


# -- job


@cli.group()
@socket_option
@click.pass_context
def job(ctx: click.Context, socket: str | None) -> None:
    """Inspect and steer jobs: show, wait, abort, retry, list.

    \b
    Example:
        hostqueue job list --status failed
    """
    ctx.obj = socket


@job.command()
@click.argument("job_id", metavar="ID", type=int)
@json_option
@click.pass_obj
def show(socket: str | None, job_id: int, as_json: bool) -> None:
    """Show one job, with its error's traceback if it has one.

    \b
    Example:
        hostqueue job show 17
    """
    data = _client(socket).get(job_id)
    _emit(data, as_json, lambda: format_job(data))


@job.command("wait")
@click.argument("job_id", metavar="ID", type=int)
@click.option("--timeout", type=click.FloatRange(min=0), metavar="S",
              help="Give up (exit 1) after S seconds; the job goes on.")
@json_option
@click.pass_obj
def wait_(socket: str | None, job_id: int, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to end and print it; exit 0 if it completed, 1 otherwise.

    \b
    Example:
        hostqueue job wait 17 --timeout 60 && echo done
    """
    client = _client(socket)
    try:
        data = _follow(client, job_id, timeout, show_progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        _interrupted(job_id)
    _finish(client, data, as_json)


@job.command()
@click.argument("job_id", metavar="[ID]", type=int, required=False)
@click.option("--run-id", metavar="R", help="Abort every unfinished job of this run instead.")
@json_option
@click.pass_obj
def abort(socket: str | None, job_id: int | None, run_id: str | None, as_json: bool) -> None:
    """Abort a job (a running one sees ctx.aborted), or every unfinished job of a run.

    \b
    Examples:
        hostqueue job abort 17
        hostqueue job abort --run-id batch-7
    """
    if (job_id is None) == (run_id is None):
        raise click.UsageError("give either a job ID or --run-id R")
    client = _client(socket)
    if job_id is not None:
        data = client.abort(job_id)
        if as_json:
            print_json(data)
        elif data.get("status") == JobStatus.RUNNING.value:
            click.echo(f"job {job_id}: abort requested; it ends cancelled when the task stops")
        else:
            click.echo(f"job {job_id}: {data.get('status')}")
        return
    assert run_id is not None
    jobs = client.abort_run(run_id)
    if as_json:
        print_json(jobs)
    else:
        click.echo(f"aborted {len(jobs)} jobs of run {run_id}")
        if jobs:
            click.echo(format_jobs(jobs))


@job.command()
@click.argument("job_id", metavar="[ID]", type=int, required=False)
@click.option("--status", type=click.Choice(RETRYABLE_STATES),
              help="Retry every job in this state instead.")
@click.option("--queue", metavar="Q", help="With --status: only jobs of this queue.")
@click.option("--task", metavar="T", help="With --status: only jobs of this task.")
@json_option
@click.pass_obj
def retry(socket: str | None, job_id: int | None, status: str | None, queue: str | None,
          task: str | None, as_json: bool) -> None:
    """Put a failed, cancelled or expired job back to pending, or every such job.

    \b
    Examples:
        hostqueue job retry 17
        hostqueue job retry --status failed --queue thumbnails
    """
    if (job_id is None) == (status is None):
        raise click.UsageError("give either a job ID or --status S")
    if job_id is not None and (queue or task):
        raise click.UsageError("--queue and --task go with --status")
    client = _client(socket)
    if job_id is not None:
        data = client.retry(job_id)
        _emit(data, as_json, lambda: f"job {job_id}: {data.get('status')}")
        return
    assert status is not None
    jobs = client.retry_all(status, queue, task)
    if as_json:
        print_json(jobs)
    else:
        click.echo(f"put {len(jobs)} {status} jobs back to pending")
        if jobs:
            click.echo(format_jobs(jobs))


@job.command("list")
@click.option("--status", type=click.Choice(ALL_STATES), help="Only jobs in this state.")
@click.option("--queue", metavar="Q", help="Only jobs of this queue.")
@click.option("--task", metavar="T", help="Only jobs of this task.")
@click.option("--run-id", metavar="R", help="Only jobs of this run.")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True, metavar="N",
              help="At most this many jobs.")
@click.option("--before", type=int, metavar="ID", help="Only jobs with an id below ID (next page).")
@json_option
@click.pass_obj
def list_(socket: str | None, status: str | None, queue: str | None, task: str | None,
          run_id: str | None, limit: int, before: int | None, as_json: bool) -> None:
    """List jobs, newest first.

    \b
    Examples:
        hostqueue job list --status failed --queue thumbnails
        hostqueue job list --run-id batch-7 --limit 1000 --json
    """
    jobs = _client(socket).list_jobs(status=status, queue=queue, task=task, run_id=run_id,
                                     limit=limit, before=before)
    if as_json:
        print_json(jobs)
    elif jobs:
        click.echo(format_jobs(jobs))
    else:
        click.echo("no jobs match", err=True)


# -- demo


@cli.command()
@click.option("--jobs", type=click.IntRange(1, 100000), default=300, show_default=True, metavar="N",
              help="How many jobs to run.")
@click.option("--workers", type=click.IntRange(1, settings.MAX_WORKERS), default=2, metavar="N",
              show_default=True, help="Workers to start with.")
@click.option("--keep", is_flag=True,
              help="Keep the demo's store and log instead of deleting them.")
@click.pass_context
def demo(ctx: click.Context, jobs: int, workers: int, keep: bool) -> None:
    """Watch hostqueue work: start a supervisor on a temporary store, run jobs with
    live progress, resize the pool, then drain and stop.

    \b
    Example:
        hostqueue demo --jobs 1000 --workers 4
    """
    from hostqueue.cli.demo import run_demo

    ctx.exit(run_demo(jobs, workers, keep))


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="hostqueue")


if __name__ == "__main__":
    main()
