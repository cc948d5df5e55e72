"""The docs cover the interface: every CLI command in docs/cli.md, every op and error
code of the control protocol in docs/protocol.md. No supervisor is started.

docs/cli.md is generated from the click command tree by ``generate_cli_md`` below:

    python3 tests/test_docs.py            # rewrite docs/cli.md
    python3 tests/test_docs.py --check    # exit 1 if docs/cli.md is out of date
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import click
import pytest

from hostqueue.cli import commands as cli_module
from hostqueue.core.errors import ERROR_CODES
from hostqueue.supervisor.operations import Operations

CLI_MD = ROOT / "docs" / "cli.md"
PROTOCOL_MD = ROOT / "docs" / "protocol.md"
PROG = "hostqueue"
WIDE = 10_000  # render usage and option lines without wrapping


# ---------------------------------------------------------------------------
# walking the command tree


def walk(command: click.Command, ctx: click.Context | None = None
         ) -> Iterator[tuple[click.Command, click.Context]]:
    """Every visible command under ``command`` (itself first), with a context whose
    command path is its full name (``hostqueue job list``). Definition order."""
    if ctx is None:
        ctx = click.Context(command, info_name=PROG, terminal_width=WIDE, max_content_width=WIDE)
    yield command, ctx
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            if sub.hidden:
                continue
            yield from walk(sub, click.Context(sub, info_name=name, parent=ctx,
                                               terminal_width=WIDE, max_content_width=WIDE))


def command_paths() -> list[str]:
    return [ctx.command_path for _, ctx in walk(cli_module.cli)]


# ---------------------------------------------------------------------------
# generating docs/cli.md


def _split_help(text: str) -> tuple[str, list[str]]:
    """A command's help as (description, example lines). The examples are the
    ``\\b`` block that starts with "Example:" or "Examples:"."""
    lines = inspect.cleandoc(text).splitlines()
    for i, line in enumerate(lines):
        if line.strip() in ("Example:", "Examples:") and i > 0 and lines[i - 1].strip() == "\b":
            description = lines[: i - 1]
            examples = []
            for ex in lines[i + 1:]:
                if not ex.strip():
                    break
                examples.append(ex.strip())
            return "\n".join(description).strip(), examples
    return "\n".join(lines).replace("\b\n", "").strip(), []


def _unwrap(text: str) -> str:
    """Docstring paragraphs joined into single lines (markdown re-wraps them anyway)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n\n".join(paragraphs)


def _section(command: click.Command, ctx: click.Context) -> list[str]:
    path = ctx.command_path
    description, examples = _split_help(command.help or "")
    usage = command.get_usage(ctx).strip()
    out = [f"## `{path}`", ""]
    if description:
        out += [_unwrap(description), ""]
    out += ["```", usage, "```", ""]
    options = []
    for param in command.get_params(ctx):
        if param.name == "help":
            continue  # every command takes -h / --help
        record = param.get_help_record(ctx)
        if record is None:
            continue  # arguments: the usage line names them, the description says what they are
        names, help_text = record
        options.append(f"- `{names}`" + (f": {' '.join(help_text.split())}" if help_text else ""))
    if options:
        out += ["Options:", ""] + options + [""]
    if isinstance(command, click.Group):
        subs = [(n, c) for n, c in command.commands.items() if not c.hidden]
        if subs:
            if ctx.parent is not None:
                out += [f"The options of `{path}` go before the subcommand's name.", ""]
            out += ["Commands:", ""]
            for name, sub in subs:
                anchor = _anchor(f"{path} {name}")
                out.append(f"- [`{name}`](#{anchor}): {sub.get_short_help_str(WIDE)}")
            out.append("")
    if not examples:
        examples = [f"{path} --help"]
    out += ["Example" + ("s" if len(examples) > 1 else "") + ":", "", "```sh", *examples, "```", ""]
    return out


def _anchor(path: str) -> str:
    """GitHub's anchor for a heading "`hostqueue job list`"."""
    return re.sub(r"[^a-z0-9 _-]", "", path.lower()).replace(" ", "-")


def generate_cli_md() -> str:
    out = [
        "# The `hostqueue` command line",
        "",
        "<!-- Generated from the click command tree by `python3 tests/test_docs.py`;",
        "     do not edit by hand: change the commands' help in hostqueue/cli/commands.py and",
        "     run it again. tests/test_docs.py fails if a command is missing here. -->",
        "",
        "Every command takes `-h` / `--help`. Every command that prints data takes",
        "`--json` for machine-readable output (the JSON shapes are those of",
        "[protocol.md](protocol.md)).",
        "",
        f"Exit codes: 0 success, {cli_module.EXIT_FAILED} the job or operation failed,",
        f"{cli_module.EXIT_USAGE} usage error, {cli_module.EXIT_UNAVAILABLE} cannot reach the "
        + "supervisor; 130 when Ctrl-C",
        "stops `submit --wait` or `job wait` (the job goes on).",
        "",
        "The socket comes from `--socket`, else `$HOSTQUEUE_SOCKET`, else the path next",
        "to the store (`--store`, else `$HOSTQUEUE_STORE`, else `./hostqueue.db`, whose",
        "socket is `./hostqueue.sock`).",
        "",
    ]
    tree = list(walk(cli_module.cli))
    for command, ctx in tree[1:]:
        depth = len(ctx.command_path.split()) - 2
        out.append("  " * depth + f"- [`{ctx.command_path}`](#{_anchor(ctx.command_path)})")
    out.append("")
    for command, ctx in tree:
        out += _section(command, ctx)
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------
# tests


def _headings(path: Path, level: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith(level + " ")]


def test_walk_finds_the_commands() -> None:
    paths = command_paths()
    assert {"hostqueue", "hostqueue run", "hostqueue ctl status", "hostqueue job list"} <= set(paths)


@pytest.mark.parametrize("path", command_paths())
def test_command_is_documented(path: str) -> None:
    documented = {name for h in _headings(CLI_MD, "##") for name in re.findall(r"`([^`]+)`", h)}
    assert path in documented, (
        f"{path!r} has no `## \\`{path}\\`` heading in docs/cli.md; "
        "regenerate it with `python3 tests/test_docs.py`"
    )


def _ops() -> list[str]:
    return sorted(name[3:] for name, _ in inspect.getmembers(Operations, inspect.isfunction)
                  if name.startswith("op_"))


def test_every_op_has_a_heading() -> None:
    ops = _ops()
    assert "submit" in ops and "watch" in ops  # the walk found the handlers
    documented = {name for h in _headings(PROTOCOL_MD, "###")
                  for name in re.findall(r"`([^`]+)`", h)}
    missing = [op for op in ops if op not in documented]
    assert not missing, f"ops without a ### `op` heading in docs/protocol.md: {missing}"


def test_every_error_code_is_documented() -> None:
    text = PROTOCOL_MD.read_text()
    missing = [code for code in ERROR_CODES if f"`{code}`" not in text]
    assert not missing, f"error codes not in docs/protocol.md: {missing}"


CONFIG_MD = ROOT / "docs" / "configuration.md"
_SETTINGS_BLOCK = re.compile(r"(<!-- settings:[^\n]*-->\n).*?(\n<!-- /settings -->)", re.S)


def generate_configuration_md() -> str:
    from hostqueue.core.settings import reference_table

    return _SETTINGS_BLOCK.sub(lambda m: m.group(1) + reference_table() + m.group(2), CONFIG_MD.read_text())


def main(argv: list[str]) -> int:
    outputs = {CLI_MD: generate_cli_md(), CONFIG_MD: generate_configuration_md()}
    if "--check" in argv:
        stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
        for p in stale:
            print(f"{p.relative_to(ROOT)} is out of date: run python3 tests/test_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for p, text in outputs.items():
        p.write_text(text)
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


def test_the_settings_table_is_current() -> None:
    assert CONFIG_MD.read_text() == generate_configuration_md(), (
        "docs/configuration.md's settings table is out of date: run python3 tests/test_docs.py"
    )


def test_every_setting_is_in_the_configuration_reference() -> None:
    from hostqueue.core.settings import SETTINGS, TABLE_SECTIONS

    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [s.toml for s in SETTINGS if f"`{s.toml}`" not in doc or f"`{s.env}`" not in doc]
    missing += [t for t in TABLE_SECTIONS if f"[{t}" not in doc]
    assert not missing, f"docs/configuration.md does not document: {missing}"


def test_the_example_configuration_is_valid(tmp_path) -> None:
    from hostqueue.core.settings import read_config_file

    values = read_config_file(str(ROOT / "docs" / "hostqueue.example.toml"))
    assert values["workers"] == 4 and "queues" in values and "schedules" in values


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
