"""The protocols of `storage/interfaces.py` and the repositories behind them stay in step.

For every protocol, its repository has each of its methods, async where the protocol's
is, with the same parameters (names, kinds, defaults); and every public method of a
repository is described by its protocol, so a new query cannot skip the interface that
the engine and the learning code depend on. Types are pyright's to check: store.py
assigns a `Store` to a `StoryStore`, and pyright fails on any mismatch.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import pytest

from storyengine import storage
from storyengine.storage import interfaces
from storyengine.storage.adapters import AdapterRepository
from storyengine.storage.database import Database
from storyengine.storage.feedback import FeedbackRepository
from storyengine.storage.games import GameRepository
from storyengine.storage.people import PeopleRepository
from storyengine.storage.store import Store
from storyengine.storage.stories import StoryRepository
from storyengine.storage.training import TrainingRepository

IMPLEMENTS: dict[type, tuple[type, ...]] = {
    StoryRepository: (interfaces.StoryRecords,),
    GameRepository: (interfaces.GameRecords,),
    FeedbackRepository: (interfaces.FeedbackRecords,),
    PeopleRepository: (interfaces.PeopleRecords,),
    TrainingRepository: (interfaces.TrainingRunRecords, interfaces.RewardModelRecords),
    AdapterRepository: (interfaces.AdapterRecords,),
}
"""Each repository mixed into `Store`, and the protocols that describe all of it."""

LIFECYCLE = interfaces.DatabaseLifecycle
"""The part of `Database` that callers use through the protocols (the rest, migrations
and backups, is for whoever makes the database: the CLI)."""

COMBINED = {interfaces.TellingRecords, interfaces.EngineRecords, interfaces.StoryStore}
"""Protocols that only combine others."""


def is_protocol(cls: object) -> bool:
    return isinstance(cls, type) and Protocol in cls.__bases__


def own_methods(cls: type) -> dict[str, Any]:
    """The public methods a class defines itself (not those it inherits)."""
    return {
        name: value
        for name, value in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }


def described(protocol: type) -> dict[str, Any]:
    """Every method a protocol declares, its own and its bases'."""
    found: dict[str, Any] = {}
    for cls in reversed(protocol.__mro__):
        if is_protocol(cls):
            found.update(own_methods(cls))
    return found


def parameters(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def drift(concrete: type, protocols: tuple[type, ...], *, complete: bool = True) -> list[str]:
    """How `concrete` differs from what `protocols` say of it (nothing: in step).
    `complete`: each of its public methods must be described too."""
    problems = []
    promised: dict[str, Any] = {}
    for protocol in protocols:
        promised.update(described(protocol))
    offered = own_methods(concrete)
    for name, declared in sorted(promised.items()):
        method = offered.get(name)
        if method is None:
            problems.append(f"{concrete.__name__} has no {name} (its protocol says it has)")
            continue
        if inspect.iscoroutinefunction(declared) != inspect.iscoroutinefunction(method):
            problems.append(f"{concrete.__name__}.{name}: async in one, not in the other")
        if parameters(declared) != parameters(method):
            problems.append(
                f"{concrete.__name__}.{name}{inspect.signature(method)} differs from"
                f" the protocol's {name}{inspect.signature(declared)}"
            )
    if complete:
        for name in sorted(set(offered) - set(promised)):
            names = ", ".join(p.__name__ for p in protocols)
            problems.append(f"{concrete.__name__}.{name} is described by no protocol ({names})")
    return problems


PROTOCOLS = sorted(
    (v for v in vars(interfaces).values() if is_protocol(v)), key=lambda p: p.__name__
)


def test_every_protocol_describes_a_repository_or_combines_others():
    aggregates = {p for protocols in IMPLEMENTS.values() for p in protocols}
    assert set(PROTOCOLS) == aggregates | {LIFECYCLE} | COMBINED
    for protocol in COMBINED:
        assert own_methods(protocol) == {}, protocol.__name__


@pytest.mark.parametrize("concrete", list(IMPLEMENTS), ids=lambda c: c.__name__)
def test_each_repository_is_what_its_protocols_say(concrete):
    assert drift(concrete, IMPLEMENTS[concrete]) == []


def test_the_database_is_what_its_lifecycle_protocol_says():
    assert drift(Database, (LIFECYCLE,), complete=False) == []


def test_an_aggregate_is_described_once():
    seen: dict[str, str] = {}
    for protocol in [*(p for ps in IMPLEMENTS.values() for p in ps), LIFECYCLE]:
        for name in own_methods(protocol):
            assert name not in seen, f"{name}: in {seen[name]} and {protocol.__name__}"
            seen[name] = protocol.__name__


def test_store_is_every_repository_and_the_story_store_every_protocol():
    """A repository mixed into `Store` without a protocol fails here; so does a
    protocol left out of `StoryStore`."""
    assert set(Store.__bases__) == {*IMPLEMENTS, Database}
    every = {p for ps in IMPLEMENTS.values() for p in ps} | {LIFECYCLE}
    assert described(interfaces.StoryStore).keys() == {
        name for protocol in every for name in own_methods(protocol)
    }
    for name, declared in described(interfaces.StoryStore).items():
        assert parameters(getattr(Store, name)) == parameters(declared), name


def test_the_package_exports_every_protocol():
    for protocol in PROTOCOLS:
        assert getattr(storage, protocol.__name__) is protocol
        assert protocol.__name__ in storage.__all__


def test_drift_is_noticed():
    """The check above catches what it is for: a renamed parameter, a lost default, a
    method made sync, a method missing, a public method no protocol describes."""

    class Drifted(GameRepository):
        async def players(self, story: int) -> list[Any]:  # renamed parameter
            return []

        async def set_turn_timeout(self, channel: str, seconds: int = 60) -> None:  # default
            pass

        def turn_timeout(self, channel: str) -> int | None:  # sync
            return None

        async def seat_count(self, story_id: int) -> int:  # undescribed
            return 0

    found = drift(Drifted, (interfaces.GameRecords,))
    assert any("players" in p and "differs" in p for p in found)
    assert any("set_turn_timeout" in p and "differs" in p for p in found)
    assert any("turn_timeout:" in p and "async" in p for p in found)
    assert any("seat_count is described by no protocol" in p for p in found)
    assert any("has no add_player" in p for p in found)  # it inherits it: not its own
    assert drift(GameRepository, (interfaces.GameRecords,)) == []
