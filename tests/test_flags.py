"""The flag declarations (engine/flags.py) and everything derived from them: the parser, the
STT_* variables, the options each flag feeds, the README table and every numeric flag's range.

These parse in-process, as ``stt-engine`` does before it starts anything: a bad flag or variable
ends the command there (tests/test_hardening.py runs the same through real subprocesses).
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from engine.cli import _security_options, _server_options, build_parser
from engine.flags import CLIENT_FLAGS, SERVE_FLAGS, SERVER_FLAGS, Flag
from engine.options import DecodeOptions, ModelOptions, ServerOptions, StreamingOptions
from engine.security import SecurityOptions
from otel import TelemetryOptions
from tests.helpers import REPO

OPTION_GROUPS = {
    "model": ModelOptions(),
    "server": ServerOptions(),
    "streaming": StreamingOptions(),
    "decode": DecodeOptions(),
    "security": SecurityOptions(),
    "telemetry": TelemetryOptions(),
}
NUMERIC = [flag for flag in SERVE_FLAGS if flag.numeric]
CHECKED = [
    flag
    for flag in SERVE_FLAGS + CLIENT_FLAGS
    if flag.numeric or flag.choices or flag.check or flag.kind is bool
]


def command(flag: Flag) -> str:
    return "serve" if flag in SERVE_FLAGS else "info"


def parse(*argv: str) -> argparse.Namespace:
    """The parsed command line; the flags' defaults are read from the environment now."""
    return build_parser().parse_args(list(argv))


def refused(capsys, *argv: str) -> str:
    """The one error line of a command line that must end with exit code 2 before anything starts."""
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def sample(flag: Flag) -> str:
    """A valid value for ``flag``, unlike its default."""
    if flag.numeric:
        low = flag.kind(flag.low)
        return str(low if flag.parse(flag.default or "") != low else flag.kind(flag.low + 1))
    if flag.kind is bool:
        return "true"
    if flag.choices:
        return next(choice for choice in flag.choices if choice != flag.default)
    return {
        "--address": "127.0.0.1:7",
        "--health-address": "127.0.0.1:8",
        "--log-level": "DEBUG",
        "--server": "10.0.0.1:50051,10.0.0.2:50051",
        "--auth-allowed-identities": "alice,bob",
    }.get(flag.name, "/models/custom")


def bad(flag: Flag) -> str:
    """A value ``flag`` refuses."""
    if flag.name == "--server":
        return "10.0.0.1:1,[::1]:2"  # one list, two address families
    return "bogus"


def test_every_flag_is_declared_once():
    for flags in (SERVE_FLAGS, CLIENT_FLAGS):
        names = [flag.name for flag in flags]
        assert len(names) == len(set(names)), names
    assert all(flag.name.startswith("--") and flag.help for flag in SERVE_FLAGS + CLIENT_FLAGS)


@pytest.mark.parametrize("flag", SERVE_FLAGS + CLIENT_FLAGS, ids=lambda flag: flag.name)
def test_every_flag_reads_its_variable(flag, monkeypatch):
    raw = sample(flag)
    monkeypatch.setenv(flag.variable, raw)
    assert getattr(parse(command(flag)), flag.dest) == flag.parse(raw)
    if flag.kind is not bool:  # the command line wins over the variable, even a bad one
        monkeypatch.setenv(flag.variable, bad(flag))
        assert getattr(parse(command(flag), flag.name, raw), flag.dest) == flag.parse(raw)


@pytest.mark.parametrize("flag", CHECKED, ids=lambda flag: flag.name)
def test_a_bad_variable_exits_2_naming_the_flag_and_the_variable(flag, monkeypatch, capsys):
    monkeypatch.setenv(flag.variable, bad(flag))
    line = refused(capsys, command(flag))
    assert f"argument {flag.name}: " in line and f"(from {flag.variable})" in line, line


@pytest.mark.parametrize("flag", [f for f in CHECKED if f.kind is not bool], ids=lambda flag: flag.name)
def test_a_bad_flag_exits_2_naming_the_flag(flag, capsys):
    line = refused(capsys, command(flag), flag.name, bad(flag))
    assert f"argument {flag.name}: {bad(flag)!r}" in line and "(from" not in line, line


def out_of_range(flag: Flag) -> list[str]:
    step = 1 if flag.kind is int else 0.05
    values = [flag.low - step]
    if flag.high is not None:
        values.append(flag.high + step)
    return [str(round(value, 2)) for value in values]


@pytest.mark.parametrize(
    "flag, value",
    [(flag, value) for flag in NUMERIC for value in out_of_range(flag)],
    ids=lambda item: item.name if isinstance(item, Flag) else item,
)
def test_every_numeric_flag_refuses_values_out_of_its_range(flag, value, monkeypatch, capsys):
    line = refused(capsys, "serve", flag.name, value)
    assert f"argument {flag.name}: {value} is out of range: must be " in line, line
    monkeypatch.setenv(flag.variable, value)
    line = refused(capsys, "serve")
    assert f"argument {flag.name}: {value} is out of range" in line and flag.variable in line, line


@pytest.mark.parametrize("flag", NUMERIC, ids=lambda flag: flag.name)
def test_every_numeric_flag_takes_its_bounds(flag):
    bounds = [flag.low] + ([flag.high] if flag.high is not None else [])
    for bound in bounds:
        text = str(flag.kind(bound))
        assert getattr(parse("serve", flag.name, text), flag.dest) == flag.kind(bound)


@pytest.mark.parametrize("flag", [f for f in SERVE_FLAGS if f.feeds], ids=lambda flag: flag.name)
def test_every_flag_feeds_an_option_field_with_the_same_default(flag):
    group, name = flag.feeds.split(".")
    options = OPTION_GROUPS[group]
    assert name in {field.name for field in dataclasses.fields(options)}, flag.feeds
    default = None if flag.default is None else flag.parse(flag.default)
    assert flag.option_value(default) == getattr(options, name), flag.name


def test_the_defaults_make_the_default_options():
    args = parse("serve")
    assert _server_options(args) == (ServerOptions(), ModelOptions())
    assert _security_options(args) == SecurityOptions()


@pytest.mark.parametrize("flag", [f for f in SERVE_FLAGS if f.feeds], ids=lambda flag: flag.name)
def test_every_flag_sets_its_option(flag):
    raw = sample(flag)
    args = parse("serve", flag.name, raw)
    server, model = _server_options(args)
    options = {
        "model": model,
        "server": server,
        "streaming": server.default_streaming,
        "decode": server.decode,
        "security": _security_options(args),
    }
    group, name = flag.feeds.split(".")
    if group != "telemetry":  # read in cmd_serve's _telemetry
        assert getattr(options[group], name) == flag.option_value(flag.parse(raw))


def test_log_levels_are_named_in_any_case():
    assert parse("serve", "--log-level", "debug").log_level == "DEBUG"
    assert parse("serve", "--log-level", "warn").log_level == "WARNING"
    with pytest.raises(ValueError):
        TelemetryOptions(log_level="verbose")


def readme_flag_table() -> dict[str, tuple[str, str]]:
    """The README's server configuration table: ``{flag: (variable, default)}``."""
    section = (REPO / "README.md").read_text().split("## Server configuration", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(STT_[A-Z_]+)` \| ([^|]+) \|", section, re.M)
    assert rows, "no flag table under ## Server configuration"
    assert len(rows) == len({flag for flag, _, _ in rows}), "a flag documented twice"
    return {flag: (variable, default.strip()) for flag, variable, default in rows}


def test_the_readme_flag_table_matches_the_declarations():
    documented = readme_flag_table()
    declared = {
        flag.name: (flag.variable, f"`{flag.default}`" if flag.default is not None else flag.unset)
        for flag in SERVE_FLAGS
    }
    assert documented.keys() - declared.keys() == set(), "documented, but no such flag"
    assert declared.keys() - documented.keys() == set(), "declared, but not documented"
    assert {name: documented[name] for name in declared} == declared


def test_the_demo_keeps_its_own_defaults(monkeypatch):
    args = parse("demo")
    assert args.address == "127.0.0.1:0" and args.log_level == "WARNING"
    assert [flag.dest for flag in SERVER_FLAGS if not hasattr(args, flag.dest)] == []


def shipped_variables() -> list[tuple[str, str, str]]:
    """Every ``STT_*`` variable the deployment files set: ``(file, variable, value)``."""
    import yaml

    found = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            if str(node.get("name", "")).startswith("STT_") and "value" in node:
                found.append((path, node["name"], str(node["value"])))
            for key, value in node.items():
                if str(key).startswith("STT_") and not isinstance(value, (dict, list)):
                    found.append((path, key, str(value)))
                walk(value, path)
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    for path in [REPO / "docker-compose.yml", *sorted((REPO / "deploy").rglob("*.yaml"))]:
        for document in yaml.safe_load_all(path.read_text()):
            walk(document, str(path.relative_to(REPO)))
    return found


def test_the_shipped_deployments_set_valid_values():
    flags = {flag.variable: flag for flag in SERVE_FLAGS}
    checked = [(path, variable, value) for path, variable, value in shipped_variables() if variable in flags]
    assert len(checked) >= 10, checked  # deployment.yaml, deployment-tls.yaml and docker-compose.yml
    for path, variable, value in checked:
        try:
            flags[variable].parse(value)
        except ValueError as exc:  # the pod would exit 2 at start
            pytest.fail(f"{path}: {variable}={value}: {exc}")
