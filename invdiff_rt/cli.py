"""The `invdiff` command line: thin Typer commands, one module per pipeline stage under `invdiff_rt.commands`.

Each stage module exposes `register(app)`; heavy imports (torch, diffusers) happen inside the commands so that
`invdiff --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

from . import validate
from .errors import InvdiffError

# Pipeline order: data -> base model -> groups -> adapter -> export -> engines -> sampling -> eval/bench.
STAGES = ("data", "model", "pretrain", "classifier", "method", "export", "engines", "generate", "eval", "bench", "demo")

app = typer.Typer(
    name="invdiff",
    help="Label-free debiasing of diffusion models (InvDiff) and a fused ONNX Runtime / TensorRT runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    for stage in STAGES:
        try:
            module = importlib.import_module(f"invdiff_rt.commands.{stage}")
        except ModuleNotFoundError as e:
            if e.name == f"invdiff_rt.commands.{stage}":
                continue  # stage not built yet
            raise
        module.register(app)


_register_all()
validate.guard(app)  # every command: options checked, then its outputs locked, before it runs


IN_PLACE = {"calibrate": "--adapter"}  # commands that write into an input's folder (calibrate: its adapter.json)


def _output_flag(argv: list[str]) -> str:
    """`--out PATH` (or `--json PATH`, or the folder a command writes in place) as given, naming where a write
    without a file name failed (a full disk)."""
    for flag in ("--out", "--json", *[IN_PLACE[a] for a in argv[:1] if a in IN_PLACE]):
        for i, arg in enumerate(argv):
            if arg.startswith(flag + "="):
                return f"{flag} {arg.split('=', 1)[1]}"
            if arg == flag and i + 1 < len(argv):
                return f"{flag} {argv[i + 1]}"
    return "output"


def main() -> None:
    try:
        validate.check_argv(sys.argv[1:])
        code = app(standalone_mode=False)  # returns the code of a typer.Exit instead of exiting
    except InvdiffError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except OSError as e:
        if e.errno not in validate.DISK_ERRORS:
            raise
        typer.secho(f"error: {e.filename or _output_flag(sys.argv[1:])}: {e.strerror}; free space (or fix "
                    "permissions) and rerun the same command: finished artifacts are intact and reused",
                    fg=typer.colors.RED, err=True)
        sys.exit(1)
    except Exception as e:  # usage errors of click or of the click copy that Typer ships (typer._click)
        if not _is_click_error(e):
            raise
        message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
        if message:  # an empty one follows the help text (a group called without a command)
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)


def _is_click_error(e: Exception) -> bool:
    """A ClickException of any click copy: it formats its own message and carries an exit code."""
    return any(cls.__name__ == "ClickException" for cls in type(e).__mro__) and hasattr(e, "format_message")


if __name__ == "__main__":
    main()
