"""CLI fuzzing: invalid arguments for every subcommand (found by walking `build_parser()`, so a new command is
covered without edits) and random `--set` overrides. Every refusal is a non-zero exit and exactly one line,
`parcae: error: …`, on stderr: argparse's usage errors too (the hub's parser prints them as one line), never
a traceback (unless `--debug`), and never the "likely a bug" wording of an unexpected exception type."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parcae.cli import build_parser, main
from parcae.model.config import ParcaeConfig
from parcae.train.config import TrainConfig, build_configs

# Derandomized: CI sees the same examples every run; PARCAE_FUZZ_EXAMPLES=2000 explores more (then randomly).
EXAMPLES = int(os.environ.get("PARCAE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 60, derandomize=not EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
FIELDS = sorted({f.name for f in dataclasses.fields(ParcaeConfig)} | {f.name for f in dataclasses.fields(TrainConfig)})


def leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(command words, parser) of every runnable subcommand, e.g. (("sweep", "plan"), <parser>)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return [(prefix, parser)]
    found, seen = [], set()
    for name, sub in groups[0].choices.items():
        if id(sub) not in seen:  # aliases name the same parser
            seen.add(id(sub))
            found += leaves(sub, (*prefix, name))
    return found


COMMANDS = leaves(build_parser())


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(action, argparse._HelpAction)


def rejects(action: argparse.Action, text: str) -> bool:
    if action.choices is not None and text not in [str(c) for c in action.choices]:
        return True
    if action.type is None:
        return False
    try:
        action.type(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return True
    return False


def placeholder(action: argparse.Action, sandbox: Path) -> str:
    """A value this argument accepts: a choice, a number its type takes, or a path that does not exist."""
    if action.choices is not None:
        return str(next(iter(action.choices)))
    if action.dest == "preset":
        return "parcae-micro"
    if action.type is not None:
        return next(text for text in ("1", "2", "0.5", "1,2", "a") if not rejects(action, text))
    return str(sandbox / f"missing-{action.dest}")


def required_args(parser: argparse.ArgumentParser, sandbox: Path, skip: argparse.Action | None = None) -> list[str]:
    argv: list[str] = []
    for action in parser._actions:
        if action is skip or not takes_value(action):
            continue
        if not action.option_strings and action.nargs not in ("?", "*"):
            argv.append(placeholder(action, sandbox))
        elif action.option_strings and action.required:
            argv += [action.option_strings[0], placeholder(action, sandbox)]
    return argv


BAD_VALUES = st.one_of(
    st.sampled_from(["", " ", "-1", "0", "nan", "inf", "-inf", "1e999", "1.5", "x", "1,,x", "0,2", "-3,4", "[]"]),
    st.text(max_size=8),
)
BAD_SETS = st.sampled_from(["no-equals-sign", "=1", "no_such_field=1", "foo.lr=1", "model.lr=1", "train.d_model=2"])


@st.composite
def invalid_command(draw, sandbox: Path) -> list[str]:
    """A subcommand with exactly one fault that must make it fail."""
    words, parser = draw(st.sampled_from(COMMANDS))
    valued = [a for a in parser._actions if takes_value(a)]
    typed = [a for a in valued if a.type is not None or a.choices is not None]
    required = [a for a in valued if a.required or (not a.option_strings and a.nargs not in ("?", "*"))]
    options = [a for a in valued if a.option_strings]
    has_set = any("--set" in a.option_strings for a in options)
    faults = ["unknown-option"] + ["bad-value"] * bool(typed) + ["missing-required"] * bool(required)
    faults += ["missing-value"] * bool(options) + ["bad-set"] * has_set
    fault = draw(st.sampled_from(faults))
    argv = [*words, *required_args(parser, sandbox)]
    if fault == "unknown-option":
        argv.append("--no-such-option-" + draw(st.text("abcdefxyz", min_size=1, max_size=6)))
    elif fault == "bad-value":
        action = draw(st.sampled_from(typed))
        value = draw(BAD_VALUES.filter(lambda text: rejects(action, text) and not text.startswith("-")))
        if action.option_strings:
            argv = [*argv, action.option_strings[0], value]
        else:
            argv = [*words, *required_args(parser, sandbox, skip=action)]
            position = [a for a in parser._actions if takes_value(a) and not a.option_strings].index(action)
            argv.insert(len(words) + position, value)
    elif fault == "missing-required":
        argv = [*words, *required_args(parser, sandbox, skip=draw(st.sampled_from(required)))]
    elif fault == "missing-value":
        argv.append(draw(st.sampled_from(options)).option_strings[0])
    else:
        argv += ["--set", draw(BAD_SETS)]
    return argv


def one_line_error(argv: list[str], capsys) -> str:
    """`parcae ARGV` must fail with exactly one `parcae: error:` line on stderr; returns it."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), argv
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("parcae: error:"), (argv, err)
    assert "Traceback" not in err and "--debug for the traceback" not in err, (argv, err)  # not an unexpected error
    return lines[0]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # a command that writes relative paths writes here
    (tmp_path / "blocker").write_text("a file where a directory is expected")
    return tmp_path


def test_every_subcommand_is_discovered() -> None:
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"train", "eval", "generate", "presets", "data prepare", "tokenizer train"} <= names
    assert all(parser.get_default("handler") is not None for _, parser in COMMANDS)


@FUZZ
@given(data=st.data())
def test_invalid_arguments_fail_with_one_line(data, sandbox: Path, capsys) -> None:
    argv = data.draw(invalid_command(sandbox))
    one_line_error(argv, capsys)


OVERRIDE_VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "[1, 2]", "[]", "{a: 1}", "'8'", ".nan", "-.inf", "[1, x]", "cuda:99", "tpu"]),
    st.text(max_size=10),
)


@FUZZ
@given(key=st.sampled_from(FIELDS), value=OVERRIDE_VALUES, prefix=st.sampled_from(["", "model.", "train."]))
def test_random_set_overrides_fail_with_one_line(key: str, value: str, prefix: str, sandbox: Path, capsys) -> None:
    """An override the config rejects is refused with the config's own message; one it accepts gets as far as
    the unwritable --out (or a check of the Trainer's); no value may crash anything on the way."""
    override = f"{prefix}{key}={value}"
    try:
        build_configs("parcae-micro", None, [override], {"steps": 1})
        expected = "parcae: error:"
    except ValueError as err:
        expected = str(err).splitlines()[0]
    argv = ["train", "--preset", "parcae-micro", "--steps", "1", "--set", override, "--no-progress",
            "--data", str(sandbox / "missing.jsonl"), "--out", str(sandbox / "blocker" / "run")]  # fmt: skip
    assert expected in one_line_error(argv, capsys), override


def test_debug_shows_the_traceback_and_a_real_process_prints_one_line(capsys) -> None:
    with pytest.raises(ValueError, match="Unknown preset"):
        main(["--debug", "flops", "--preset", "parcae-9t"])
    # A fresh interpreter: nothing printed at import time or by warnings either.
    result = subprocess.run([sys.executable, "-m", "parcae", "train", "--steps", "x"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "default"})  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "parcae: error: argument --steps: expected a positive integer, got 'x' (see `parcae train --help`)"
    ]
