"""trainers.config: one validation, one --set parser and generated CLI options for every config."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdstore.errors import ConfigError
from trainers.config import ConfigProblems, Rules, check, cli_options, field_help, make, parse_set

RULES = Rules(choices={"mode": ("a", "b")}, positive=("lr", "epochs"), non_negative=("clip",), fraction=("drop",))


@dataclass
class Toy:
    lr: float = 1e-3  # learning rate
    epochs: int = 3  # passes over the data
    drop: float = 0.1
    mode: str = "a"  # a or b
    hist: tuple[int, ...] = ()  # history lengths
    init: str | None = None  # checkpoint dir
    flag: bool = False  # a switch
    clip: float | None = None

    def __post_init__(self):
        check(self, RULES, lambda c: [f"drop: {c.drop} with {c.epochs} epochs"] if c.drop * c.epochs > 2 else [])


def test_every_problem_is_named_at_once_on_one_line():
    with pytest.raises(ConfigError) as e:
        make(Toy, {"lr": -1, "epochs": 0, "mode": "z", "bogus": 1, "drop": "x", "clip": -2})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Toy: ")
    for part in ("bogus: unknown option", "drop: expected float, got 'x'", "mode: expected one of a, b, got 'z'",
                 "lr: expected > 0, got -1", "epochs: expected > 0, got 0", "clip: expected >= 0, got -2"):
        assert part in msg, (part, msg)
    assert len(e.value.problems) == 6


def test_relations_are_checked_once_every_field_is_valid():
    with pytest.raises(ConfigProblems, match=r"drop: 0.5 with 9 epochs"):
        make(Toy, {"epochs": 9, "drop": 0.5})
    with pytest.raises(ConfigProblems) as e:  # a mistyped field: only the type problem, no relation crash
        make(Toy, {"epochs": "9", "drop": 0.5})
    assert e.value.problems == ["epochs: expected int, got '9'"]


def test_layers_overlay_in_order():
    cfg = make(Toy, {"lr": 0.5, "epochs": 4, "clip": 1.0}, {"epochs": 2, "clip": None}, {"hist": [5, 10]})
    assert (cfg.lr, cfg.epochs, cfg.clip, cfg.hist) == (0.5, 2, None, (5, 10))


def test_bool_is_not_an_int_and_int_is_a_float():
    assert make(Toy, {"lr": 1}).lr == 1
    with pytest.raises(ConfigProblems, match="epochs: expected int, got True"):
        make(Toy, {"epochs": True})


def test_parse_set_types_each_value_by_its_field():
    got = parse_set(Toy, ["lr=2e-4", "epochs=7", "mode=b", "hist=5,10,15", "init=none", "flag=true", "clip=null"])
    assert got == {"lr": 2e-4, "epochs": 7, "mode": "b", "hist": (5, 10, 15), "init": None, "flag": True, "clip": None}
    assert parse_set(Toy, ["hist=[3, 4]", "init=/ckpt", "flag=0"]) == {"hist": (3, 4), "init": "/ckpt", "flag": False}


def test_parse_set_names_every_bad_pair():
    with pytest.raises(ConfigProblems) as e:
        parse_set(Toy, ["lr=abc", "nope=1", "x", "hist=1,a", "epochs=2.5"])
    assert e.value.problems[0] == "lr: expected float, got 'abc'"
    assert e.value.problems[1].startswith("nope: unknown option (known: lr, epochs")
    assert e.value.problems[2:] == ["--set 'x': expected key=value", "hist: expected a list of int, got '1,a'",
                                    "epochs: expected int, got '2.5'"]


@given(lr=st.floats(1e-9, 1e3), epochs=st.integers(1, 20), hist=st.lists(st.integers(1, 99), max_size=4),
       flag=st.booleans(), init=st.one_of(st.none(), st.text("abc/_-.", min_size=1).filter(lambda s: s.lower() not in ("none", "null"))))
def test_parse_set_round_trips_rendered_values(lr, epochs, hist, flag, init):
    pairs = [f"lr={lr!r}", f"epochs={epochs}", f"hist={','.join(map(str, hist))}", f"flag={str(flag).lower()}",
             f"init={'none' if init is None else init}"]
    got = make(Toy, parse_set(Toy, pairs))
    assert (got.lr, got.epochs, got.hist, got.flag, got.init) == (lr, epochs, tuple(hist), flag, init)


def test_field_help_is_the_fields_comment():
    helps = field_help(Toy)
    assert helps["lr"] == "learning rate" and helps["hist"] == "history lengths" and "drop" not in helps


def _app():
    app = typer.Typer()

    @app.command()
    @cli_options(Toy, skip=("clip",))
    def run(store: str, lr_hint: int = typer.Option(0), sets: list[str] = typer.Option([], "--set"), options: dict = None):
        cfg = make(Toy, {"epochs": 5}, parse_set(Toy, sets), options)
        print(store, cfg)

    @app.command()
    def other() -> None:
        """A second command so that typer keeps command names."""

    return app


def test_generated_options_reach_the_command_typed_and_agree_with_set():
    runner = CliRunner()
    flags = runner.invoke(_app(), ["run", "s", "--lr", "0.5", "--hist", "5,10", "--flag", "--init", "/c", "--mode", "b"])
    sets = runner.invoke(_app(), ["run", "s", "--set", "lr=0.5", "--set", "hist=5,10", "--set", "flag=true",
                                  "--set", "init=/c", "--set", "mode=b"])
    assert flags.exit_code == 0, flags.output
    assert flags.output == sets.output
    assert "Toy(lr=0.5, epochs=5, drop=0.1, mode='b', hist=(5, 10), init='/c', flag=True, clip=None)" in flags.output


def test_generated_options_are_listed_with_their_comments_and_skip_works():
    out = CliRunner().invoke(_app(), ["run", "--help"], terminal_width=200).output
    assert "--epochs" in out and "passes over the data" in out and "--no-flag" in out
    assert "--clip" not in out
    bad = CliRunner().invoke(_app(), ["run", "s", "--hist", "1,x"])
    assert bad.exit_code != 0 and "hist: expected a list of int, got '1,x'" in str(bad.exception)


BOUNDS = Rules(positive=("hist",), probability=("p",), minimum={"n": 8})


@dataclass
class Bounded:
    hist: tuple[int, ...] = (1,)
    p: float = 0.5
    n: int = 8

    def __post_init__(self):
        check(self, BOUNDS)


def test_probability_minimum_and_every_item_of_a_tuple():
    with pytest.raises(ConfigProblems) as e:
        make(Bounded, {"hist": [3, 0], "p": 1.0, "n": 7})
    assert e.value.problems == ["hist: expected > 0 each, got (3, 0)", "p: expected in (0, 1), got 1.0",
                                "n: expected >= 8, got 7"]
    with pytest.raises(ConfigProblems, match=r"p: expected in \(0, 1\), got 0"):
        Bounded(p=0)
    cfg = make(Bounded, {"hist": [], "p": 0.01, "n": 8})
    assert (cfg.hist, cfg.p, cfg.n) == ((), 0.01, 8)


def test_generated_options_take_named_flags_and_show_field_defaults_without_a_preset():
    app = typer.Typer()

    @app.command()
    @cli_options(Toy, RULES, flags={"flag": "--flag/--plain"}, preset=False)
    def run(options: dict = None):
        print(make(Toy, options))

    @app.command()
    def other() -> None:
        """A second command so that typer keeps command names."""

    runner = CliRunner()
    out = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    for part in ("--plain", "learning rate; default 0.001", "a or b; one of a, b; default a", "history lengths; default ()",
                 "checkpoint dir; default none", "a switch; default false"):
        assert part in out, (part, out)
    assert "--no-flag" not in out and "(default: the preset's)" not in out
    assert "flag=False" in runner.invoke(app, ["run", "--plain"]).output
    assert "flag=True" in runner.invoke(app, ["run", "--flag"]).output
    assert "Toy(lr=0.001, epochs=3, drop=0.1, mode='a', hist=(), init=None, flag=False, clip=None)" in runner.invoke(app, ["run"]).output


def test_the_cli_reads_every_config_without_importing_torch():
    """The generated options need the configs at import; ``kdstore --help`` must stay fast."""
    code = "import sys, cli; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)


def test_a_commands_config_is_its_preset_then_set_then_options():
    """The one merge of the config commands (pretrain-lm, build-teacher, train-student)."""
    from cli import _config
    from trainers.student.config import StudentConfig
    from trainers.student.config import preset as student_preset
    from trainers.teacher.config import PretrainConfig

    cfg = _config(StudentConfig, ["epochs=7", "lr=0.5"], {"lr": 0.25}, student_preset, "ek55")
    assert cfg == student_preset("ek55", epochs=7, lr=0.25) and cfg != student_preset("egtea", epochs=7, lr=0.25)
    assert _config(PretrainConfig, ["mask_prob=0.2"], {"mask_prob": 0.3}) == make(PretrainConfig, {"mask_prob": 0.3})
    with pytest.raises(ConfigProblems, match="nope: unknown option"):
        _config(PretrainConfig, ["nope=1"], {})
