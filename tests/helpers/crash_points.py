"""What the crash children (crash_child.py for adapters, reward_crash_child.py for reward
models) and their tests share: the steps of registering and promoting a version a child
dies at, how it dies there, how it is run, and what is checked after.

A child dies with `os._exit(9)`: no `finally`, `except` or exit handler runs and no
buffer is flushed, as with kill -9 or a power cut.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEPS = ("writing", "renamed", "inserted", "promoting", "promoted")
HELPERS = Path(__file__).parent
VERSION_DIR = re.compile(r"v(\d{4,})")


def die() -> None:
    os._exit(9)


def always(*args: Any) -> bool:
    return True


def die_after(owner: Any, name: str, when: Callable[..., bool] = always) -> None:
    """Patch `owner.name` to die right after it returns, if `when(*its arguments)`."""
    original = getattr(owner, name)
    if inspect.iscoroutinefunction(original):

        async def call_then_die(*args, **kwargs):
            result = await original(*args, **kwargs)
            if when(*args):
                die()
            return result

        setattr(owner, name, call_then_die)
    else:

        def then_die(*args, **kwargs):
            result = original(*args, **kwargs)
            if when(*args):
                die()
            return result

        setattr(owner, name, then_die)


def die_before(owner: Any, name: str, when: Callable[..., bool] = always) -> None:
    """Patch the coroutine `owner.name` to die instead of running, if `when(*its
    arguments)`."""
    original = getattr(owner, name)

    async def die_or_call(*args, **kwargs):
        if when(*args):
            die()
        return await original(*args, **kwargs)

    setattr(owner, name, die_or_call)


def inject(step: str, registry: type, *, temporary: str, table: str) -> None:
    """Patch the `registry` class (its versions written under directories named
    `temporary`..., its rows in `table`) to die at `step` ("writing" is the child's)."""
    if step == "renamed":  # the version directory renamed into place, its row not inserted
        die_after(os, "replace", when=lambda src, *_: Path(src).name.startswith(temporary))
    elif step == "inserted":  # the row inserted, the version not promoted
        die_before(registry, "promote")
    elif step == "promoting":  # the UPDATE that retired the old version is not committed
        import aiosqlite

        promoting = f"UPDATE {table} SET status = 'promoted'"
        die_before(
            aiosqlite.Connection, "execute", when=lambda _, sql, *__: sql.startswith(promoting)
        )
    elif step == "promoted":
        die_after(registry, "promote")


Steps = Callable[..., Awaitable[None]]


def run_child(
    argv: list[str], inject_at: Callable[[str], None], registry_steps: Steps, round_steps: Steps
) -> None:
    """A crash child's `main`: `registry|round STEP PATH...`, the step's patch injected,
    then `registry_steps(step, *paths)` or `round_steps(step, *paths)`, which must not
    return."""
    kind, step, *paths = argv
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    inject_at(step)
    steps = registry_steps if kind == "registry" else round_steps
    asyncio.run(steps(step, *map(Path, paths)))
    print(f"finished without reaching the crash point {step!r}", file=sys.stderr)


def round_config():
    """A round that trains the tiny model quickly and promotes what it learned."""
    from storyengine.learning.evaluation import GateConfig
    from storyengine.learning.rounds import RoundConfig
    from storyengine.learning.training import TrainConfig

    return RoundConfig(
        method="kto",
        train=TrainConfig(
            learning_rate=5e-3, epochs=2, batch_size=8, lora_r=4, max_length=64, min_examples=4
        ),
        # A random model's perplexity says nothing: the gate judges preferences only.
        gate=GateConfig(max_ppl_increase=10.0, max_ppl_vs_base=10.0, samples=0),
        drift_guard=None,
    )


async def run_round_to_crash(settings: Any) -> None:
    """A child's real round, its lines printed as they come."""
    from storyengine.learning.rounds import run_round

    await run_round(settings, round_config(), say=lambda line: print(line, flush=True))


# What the tests do with a child.


async def crash(child: str, *args: str) -> str:
    """Run the child `child` (in tests/helpers) with `args`; it must die at its crash point
    (status 9). Returns its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HELPERS / child),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode == 9, out.decode()
    return out.decode()


def files(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}


def save_tiny_model(path: Path) -> Path:
    """The tiny random GPT-2 saved at `path` as a base model a round can load."""
    from tests.helpers.models import make_tiny_model

    loaded = make_tiny_model(n_positions=1024)  # held-out stories run to 512 tokens
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


@dataclass(frozen=True)
class Layout:
    """Where a registry keeps its versions: `temporary`... while one is written, `marker`
    in every version directory, at most one promoted per `lineage`."""

    temporary: str
    marker: str
    lineage: Callable[[Any], object] = lambda version: None

    async def check(self, registry: Any) -> None:
        """No leftovers where the registry looks, a row for every version directory, a
        directory for every row, at most one promoted per lineage."""
        root = registry.root
        assert not list(root.glob(self.temporary + "*"))
        on_disk = {int(m.group(1)) for p in root.iterdir() if (m := VERSION_DIR.fullmatch(p.name))}
        versions = await registry.list()
        assert on_disk == {v.version for v in versions}
        assert all((v.path / self.marker).is_file() for v in versions)
        lineages = [self.lineage(v) for v in versions if v.status == "promoted"]
        assert len(lineages) == len(set(lineages))

    async def check_recovered(
        self,
        registry: Any,
        step: str,
        served: Any,
        served_files: dict[str, str],
        register: Callable[[], Awaitable[Any]],
    ) -> None:
        """After a child died at `step` of registering and promoting version 2 over the
        `served` version 1 (whose files were `served_files`): the registry is consistent,
        holds what the step got to, and the next version (`register()`) registers and
        promotes as usual."""
        await self.check(registry)
        promoted = await registry.promoted()
        if step == "promoted":  # the promotion committed: v2 is served, v1 retired
            assert promoted.version == 2 and (await registry.get(1)).status == "retired"
        else:  # the promotion never happened, or rolled back whole
            assert promoted.version == 1 and files(promoted.path) == served_files
        if step == "inserted":  # a candidate stays one: it may still be promoted
            assert (await registry.get(2)).status == "candidate"
        if step == "renamed":  # the whole version without a row is kept, out of the way
            (orphan,) = (registry.root / "orphaned").iterdir()
            assert orphan.name.startswith("v0002-") and (orphan / self.marker).is_file()

        new = await register()
        assert (await registry.promote(new.version)).status == "promoted"
        await self.check(registry)
        assert (await registry.promoted()).version == new.version
        assert files(served.path) == served_files
