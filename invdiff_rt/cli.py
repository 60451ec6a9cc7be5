"""The `invdiff` command line: thin Typer commands, one module per pipeline stage under `invdiff_rt.commands`.

Each stage module exposes `register(app)`; heavy imports (torch, diffusers) happen inside the commands so that
`invdiff --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

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


def main() -> None:
    try:
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
    except Exception as e:  # click usage errors etc.
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
