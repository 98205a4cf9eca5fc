"""Config dataclasses as the one source of their options (`storyengine.options`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from storyengine.bench.configs import LearningBenchConfig, ServeBenchConfig, SoakConfig
from storyengine.cli.parser import build_parser
from storyengine.errors import InvalidInput
from storyengine.learning.sft import CorpusTrainConfig
from storyengine.learning.training import TrainConfig
from storyengine.options import add_options, check_options, from_args, option


def subparsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from subparsers(child, (*path, name))


def test_every_option_says_what_it_does():
    for path, parser in subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            if action.option_strings:
                assert action.help, f"storyengine {' '.join(path)} {action.option_strings[0]}"


@pytest.mark.parametrize(
    "argv, config",
    [
        (["train", "round"], TrainConfig),
        (["train", "sft", "--corpus", "c.txt"], CorpusTrainConfig),
        (["bench", "serve"], ServeBenchConfig),
        (["bench", "learning"], LearningBenchConfig),
        (["bench", "soak"], SoakConfig),
    ],
)
def test_the_commands_defaults_are_their_configs(argv, config):
    """No default is written twice: the options given nothing make the config's own."""
    args = build_parser().parse_args(argv)
    assert from_args(config, args) == config()


def test_options_reach_the_config_typed_and_checked():
    parser = build_parser()
    args = parser.parse_args(["train", "round", "--lr", "0.002", "--beta", "0.3", "--seed", "4"])
    train = from_args(TrainConfig, args)
    assert (train.learning_rate, train.beta, train.seed) == (0.002, 0.3, 4)
    args = parser.parse_args(["bench", "learning", "--communities", "animals, gloomy"])
    assert from_args(LearningBenchConfig, args).communities == ("animals", "gloomy")
    with pytest.raises(InvalidInput, match=r"^--minutes: must be above 0, got 0"):
        from_args(SoakConfig, parser.parse_args(["bench", "soak", "--minutes", "0"]))
    with pytest.raises(InvalidInput, match=r"^--batch-size: must be at least 2, got 1"):
        from_args(TrainConfig, parser.parse_args(["train", "round", "--batch-size", "1"]))
    with pytest.raises(SystemExit):  # argparse refuses what the type cannot read
        parser.parse_args(["bench", "serve", "--requests", "many"])


@dataclass(frozen=True)
class Example:
    size: int = option(3, low=1, high=9, help="a bounded whole number")
    rate: float | None = option(None, above=0, below=1, flags=("--rate", "-r"), help="a share")
    kind: Literal["a", "b"] = option("a", help="one of two")
    loud: bool = option(False, help="a switch")
    names: tuple[str, ...] = option((), help="comma-separated")
    hidden: int = option(0, cli=False, help="not on the command line")
    tidy: bool = option(True, help="on unless told --no-tidy")

    def __post_init__(self) -> None:
        check_options(self)


def test_a_field_becomes_an_option():
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    args = parser.parse_args(
        ["--size", "4", "-r", "0.5", "--kind", "b", "--loud", "--names", "x,y"]
    )
    assert from_args(Example, args) == Example(
        size=4, rate=0.5, kind="b", loud=True, names=("x", "y")
    )
    assert not hasattr(parser.parse_args([]), "hidden")
    assert from_args(Example, parser.parse_args(["--no-tidy"])).tidy is False
    assert from_args(Example, parser.parse_args([])).tidy is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "c"])
    for bad, message in [
        ({"size": 10}, "--size: must be 1..9, got 10"),
        ({"size": 2.5}, "--size: expected a whole number, got 2.5"),
        ({"rate": 1.0}, "--rate: must be above 0 and below 1, got 1.0"),
        ({"kind": "c"}, "--kind: expected a or b, got 'c'"),
    ]:
        with pytest.raises(ValueError) as info:
            Example(**bad)  # type: ignore[arg-type]
        assert str(info.value) == message
