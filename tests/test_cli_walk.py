"""Walk the Typer app: every command, every option, bad values generated from the option's type and its rule.

Each case runs `invdiff_rt.cli.main` in-process (sys.argv patched) in a scratch working folder and must end with
exit code 2, exactly one stderr line naming the flag, no traceback, and the folder unchanged. Which generated values
are bad comes from `validate.RULES` (the table the checks use), so a new option is walked without a new test. The
commands themselves are replaced by stubs that fail the case if validation ever lets a bad value through.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import pytest
import typer

from invdiff_rt import cli, validate

INT_VALUES = ("abc", "1.5", "nan", "0", "-1", "100000")
FLOAT_VALUES = ("abc", "nan", "inf", "-inf", "0", "-1", "1e9")
TEXT_VALUES = ("", "   ", "bogus")
PATH_VALUES = ("", "missing/none", "afile.txt", "adir", "afile.txt/below")
LIST_VALUES = ("", "   ", "bogus", "0", "1,,2", "1,-1")
APP = cli.app  # the Typer app (the `stubbed` fixture swaps `cli.app` for a prebuilt click command)
NOT_A_NUMBER = ("abc", "1.5", "nan", "inf", "-inf", "")


class Ran(AssertionError):
    """A command body ran: its options were accepted."""


def _stub(func):
    @functools.wraps(func)
    def refuse(**values):
        raise Ran(f"{func.__name__} ran with {values}")

    return refuse


def _all_params():
    return [(path, info, p) for path, info in validate.commands(APP)
            for p in validate.params(info.callback.__wrapped__) if p.type is not bool]


def _candidates(command: str, param: validate.Param) -> tuple[str, ...]:
    rule = validate.rule_for(command, param)
    above = () if rule.max is None else (str(int(rule.max) + 1) if param.type is int else repr(rule.max * 2 + 1),)
    if param.type is int:
        return INT_VALUES + above  # just above an upper bound (e.g. a 33-bit --seed)
    if param.type is float:
        return FLOAT_VALUES + above
    if param.type is Path or rule.path == "model":
        return PATH_VALUES + (("bogus",) if rule.path == "model" else ())
    return LIST_VALUES if rule.comma else TEXT_VALUES


def _number_ok(rule: validate.Rule, raw: str) -> bool:
    try:
        values = [float(item) for item in raw.split(",")]
    except ValueError:
        return False
    return all(_in_range(rule, value) for value in values)


def _in_range(rule: validate.Rule, value: float) -> bool:
    return not ((rule.min is not None and value < rule.min) or (rule.above is not None and value <= rule.above)
                or (rule.max is not None and value > rule.max) or (rule.below is not None and value >= rule.below))


def is_bad(command: str, param: validate.Param, raw: str) -> bool:
    """Whether `raw` breaks the declared rule of the option (derived from `validate.RULES`, not from the checks)."""
    rule = validate.rule_for(command, param)
    if raw == "" or raw.strip() == "" or raw == "afile.txt/below":
        return True
    if rule.comma and rule.choices is not None:
        return any(item not in rule.choices() for item in raw.split(","))
    if param.type in (int, float) or (rule.comma and rule.choices is None):
        if raw in NOT_A_NUMBER or (param.type is int and raw == "1.5"):
            return True
        return not _number_ok(rule, raw)
    kind = rule.path
    if raw == "missing/none" or raw == "bogus" and kind == "model":
        return kind in validate.INPUT_KINDS
    if raw == "afile.txt":
        return kind in ("dir", "out_dir", "cache", "prefix", "model")
    if raw == "adir":
        return kind in ("file", "out_file", "prefix", "model")
    return rule.choices is not None


def _valid(command: str, param: validate.Param) -> str:
    """A value the rule accepts, for the required options that are not under test."""
    rule = validate.rule_for(command, param)
    if rule.choices is not None:
        return list(rule.choices())[0]
    if param.type in (int, float):
        low = rule.min if rule.min is not None else (rule.above + 1 if rule.above is not None else 1)
        return str(int(low) if param.type is int else float(low))
    paths = {"dir": "adir", "file": "afile.txt", "prefix": "prefix", "model": "colored-digits"}
    return paths.get(rule.path, "new-output" if rule.path else "color")


def _argv(command: str, info, target: validate.Param | None, raw: str | None) -> list[str]:
    argv = command.split()
    for p in validate.params(info.callback.__wrapped__):
        mine = target is not None and p.name == target.name
        value = raw if mine else (_valid(command, p) if p.required else None)
        if value is None:
            continue
        argv += [value] if p.argument else [p.flag, value]
    return argv


def _cases():
    cases = []
    for command, info, p in _all_params():
        if p.required:
            cases.append((command, p.name, None))
        cases += [(command, p.name, raw) for raw in _candidates(command, p) if is_bad(command, p, raw)]
    return cases


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("walk")
    (root / "adir").mkdir()
    (root / "afile.txt").write_text("a file\n")
    (root / "prefix.json").write_text("{}\n")
    (root / "prefix.safetensors").write_bytes(b"")
    return root


@pytest.fixture
def stubbed(monkeypatch):
    """Command bodies replaced by stubs that fail the case; the real guard still checks the options. The click
    command is built once (as `app()` does on every call) so that the hundreds of cases stay fast."""
    import typer.main

    for command, info in validate.commands(APP):
        original = info.callback.__wrapped__
        monkeypatch.setattr(info, "callback", validate._guarded(command, _stub(original)))
    click_command = typer.main.get_command(APP)
    monkeypatch.setattr(cli, "app", lambda **kwargs: click_command(**kwargs))


def _run(argv, workspace, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "argv", ["invdiff", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


CASES = _cases()


def test_every_command_is_guarded_and_walked():
    guarded = [path for path, info in validate.commands(APP) if getattr(info.callback, "_invdiff_guarded", 0)]
    walked = {c for c, _, _ in CASES}
    assert guarded == [path for path, _ in validate.commands(APP)] and len(guarded) >= 14
    assert walked == set(guarded) and len(CASES) >= 300


def test_walk_every_option_with_bad_values(workspace, stubbed, monkeypatch, capsys):
    failures = []
    params = {(c, p.name): (info, p) for c, info, p in _all_params()}
    before = _snapshot(workspace)
    for command, name, raw in CASES:
        info, param = params[(command, name)]
        argv = _argv(command, info, param, raw)
        try:
            code, err = _run(argv, workspace, monkeypatch, capsys)
        except Ran as e:
            failures.append(f"{argv}: accepted ({e})")
            continue
        lines = err.strip().splitlines()
        named = param.flag in err or param.argument
        if code != 2 or len(lines) != 1 or "Traceback" in err or not named or _snapshot(workspace) != before:
            failures.append(f"{argv}: exit {code}, stderr {err!r}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases failed:\n" + "\n".join(failures[:40])


def test_unknown_option_and_command_are_one_line(workspace, stubbed, monkeypatch, capsys):
    for argv in (["generate", "--no-such-flag"], ["no-such-command"], ["data", "make", "--out"]):
        code, err = _run(argv, workspace, monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)


def test_params_reads_both_typer_declaration_styles():
    """Options declared with `Annotated[...]` (as other branches may add them) are walked under their real flag."""
    def command(size: Annotated[int, typer.Option("--height")] = 32,
                peers: Annotated[Optional[Path], typer.Option()] = None,
                name: Annotated[str, typer.Argument()] = ...,
                tags: Optional[List[str]] = typer.Option(None, "--tag"),
                out: Path = typer.Option(..., "--out"), ctx: typer.Context = None):
        pass

    got = [(p.name, p.flag, p.type, p.multiple, p.required, p.argument) for p in validate.params(command)]
    assert got == [("size", "--height", int, False, False, False), ("peers", "--peers", Path, False, False, False),
                   ("name", "NAME", str, False, True, True), ("tags", "--tag", str, True, False, False),
                   ("out", "--out", Path, False, True, False)]
