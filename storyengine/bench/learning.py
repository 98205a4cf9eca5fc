"""`storyengine bench learning`: the whole loop without Discord.

A simulated audience with a stated taste reacts to the storyteller's story openings;
each round then trains on those reactions (the reward model, then the adapter), gates
and (maybe) promotes them, and the running engine picks them up. Before the first round
and after each, the audience's approval, 👍 / (👍 + 👎), is measured on fresh prompts
never used for training, with the perplexity on held-out stories and the repetition of
the samples.

Approval is measured three ways from the same candidates, so each lever's share shows:

    approval                what users see: the adapter served, plus best-of-n when a
                            reward model is promoted (the candidate it scores best)
    approval_adapter_only   the adapter served, one continuation (the first candidate)
    approval_best_of_only   the base model's candidates, ranked by the reward model

The base model's candidates are written once and ranked again by each round's reward
model. With `--communities A,B` several simulated servers, each with its own taste,
learn side by side: each community's rounds train its own adapter and reward model on
its own reactions; a shared arm trains one adapter and one reward model on everyone's
reactions (the same ones), and each community's approval under the shared arm is
reported beside its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import Settings
from ..learning.audience import Taste, load_taste
from ..learning.datasets import DatasetConfig
from ..learning.evaluation import perplexity, repetition
from ..learning.rounds import PERPLEXITIES, RoundConfig, heldout_stories, run_round
from ..learning.training import TrainConfig
from ..progress import Progress
from ..records import Author
from ..sampling import SamplingParams
from ..serving.generation import BASE_ADAPTER
from .configs import LearningBenchConfig

NAMES = ("Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam", "Lucy", "Jack", "Emma", "Leo")
PLACES = (
    "park",
    "garden",
    "kitchen",
    "school",
    "beach",
    "library",
    "market",
    "playground",
    "hill",
    "attic",
)
THINGS = (
    "a red ball",
    "a shiny key",
    "a small box",
    "a kite",
    "a blue hat",
    "a toy car",
    "a book",
    "a cake",
)


def story_prompts(seed: int = 0) -> list[str]:
    """Neutral story openings (no animals, no moods), in a fixed shuffled order."""
    prompts = [
        f"Once upon a time, {name} went to the {place} and found {thing}."
        for name, place, thing in itertools.product(NAMES, PLACES, THINGS)
    ]
    random.Random(seed).shuffle(prompts)
    return prompts


@dataclass
class Audience:
    """A simulated community: its taste, its id, and where its prompts come from."""

    name: str
    taste: Taste
    community: str | None
    """None: the operator's own stories (the shared lineage), as in a one-taste run."""
    train_prompts: Any


async def bench_learning(
    *, taste_spec: str, config: LearningBenchConfig, device: str, json_path: Path | None
) -> dict[str, Any]:
    import torch

    from ..story.engine import StoryEngine

    torch.manual_seed(config.seed)  # the unseeded generations draw from this
    prompts = story_prompts(config.seed)
    eval_prompts = prompts[: config.prompts_measured]
    pool = prompts[config.prompts_measured :]
    names = config.communities or (taste_spec,)
    audiences = [
        Audience(
            name,
            load_taste(name),
            f"bench-{i}" if config.communities else None,
            iter(pool[i :: len(names)] * 10),
        )
        for i, name in enumerate(names)
    ]
    with tempfile.TemporaryDirectory(prefix="taleweaver-bench-") as scratch:
        settings = Settings(
            db_path=Path(scratch) / "bench.db",
            adapter_dir=Path(scratch) / "adapters",
            device=device,
            sampling=SamplingParams(max_new_tokens=config.max_new_tokens),
            max_batch_size=64,
            best_of=config.best_of,
        )
        base_config = RoundConfig(
            method=config.method,  # type: ignore[arg-type]
            data=DatasetConfig(seed=config.seed),
            train=TrainConfig(
                learning_rate=config.learning_rate, epochs=config.epochs, seed=config.seed
            ),
        )
        async with StoryEngine(settings) as engine:
            for audience in audiences:
                if audience.community is not None:
                    await engine.set_learning(audience.community, True, by=None)
            bench = _Bench(engine, settings, config, eval_prompts)
            own: dict[str, list[dict[str, Any]]] = {a.name: [] for a in audiences}
            shared: dict[str, list[dict[str, Any]]] = {a.name: [] for a in audiences}
            lineages = [a.community for a in audiences]
            if config.communities:
                lineages.append(None)  # the shared arm, on everyone's reactions
            for round_no in range(config.rounds + 1):
                started = time.perf_counter()
                outcomes: dict[str | None, Any] = {}
                if round_no > 0:  # the servers' audiences at once, as on one bot
                    await asyncio.gather(*(bench.react(a, round_no) for a in audiences))
                    for community in lineages:
                        _progress(f"round {round_no}: training {community or 'shared'}")
                        outcomes[community] = await run_round(
                            settings,
                            replace(base_config, community=community),
                            say=_progress,
                        )
                await bench.write_candidates(lineages, round_no)
                for audience in audiences:
                    arms = [(own, audience.community)]
                    if config.communities:
                        arms.append((shared, None))
                    for table, lineage in arms:
                        row = await bench.measure(audience, lineage, round_no)
                        result = outcomes.get(lineage)
                        row["promoted"] = bool(result and result.status == "promoted")
                        if result is not None:
                            row["gate"] = result.reason or result.status
                            if result.version is not None:
                                row["version"] = result.version.name
                            reward = result.metrics.get("reward") or {}
                            row["reward"] = {
                                k: reward[k] for k in ("status", "accuracy") if k in reward
                            }
                        row["seconds"] = time.perf_counter() - started
                        table[audience.name].append(row)
                        _print_row(audience.name if config.communities else "", lineage, row)
    if config.communities:
        results: dict[str, Any] = {
            "communities": {name: {"rounds": rows} for name, rows in own.items()},
            "shared": {name: {"rounds": rows} for name, rows in shared.items()},
        }
    else:
        results = {"taste": taste_spec, "rounds": own[taste_spec]}
    if json_path is not None:
        await asyncio.to_thread(json_path.write_text, json.dumps(results, indent=2) + "\n", "utf-8")
    return results


class _Bench:
    """What the bench does with the engine: reactions, and approval measured three ways."""

    def __init__(
        self, engine: Any, settings: Settings, config: LearningBenchConfig, prompts: list[str]
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.config = config
        self.prompts = prompts
        self.base_candidates: list[list[str]] | None = None
        self.measured: dict[str, tuple[list[list[str]], float]] = {}
        """Each adapter's candidates and perplexity, by its name: the same adapter on the
        same prompts and seeds writes the same candidates, so each is written (and its
        perplexity taken) once, however many rows serve it (with `--communities`, every
        community's shared arm; an adapter kept over a rejected round)."""
        self.rankings: dict[tuple[str, Any], list[str]] = {}
        """Each (adapter's candidates, reward model version)'s choices (`ranked`)."""
        self.features: dict[Any, Any] = {}
        """The base model's features of the candidates, by feature spec: every reward
        model ranks the base model's candidates again, and two rank each adapter's."""
        self.texts = heldout_stories()
        self._ppl_model: Any = None
        """A private copy of the base model for perplexity: adapters are loaded onto it,
        never behind the scheduler's back onto the serving model."""

    async def react(self, audience: Audience, round_no: int) -> None:
        """The audience reacts to openings told through the engine (as a server's
        stories are: best-of-n once a reward model is promoted)."""
        n = self.config.reactions // self.config.openings
        batch = [next(audience.train_prompts) for _ in range(n)]
        tag = f"{audience.name}-train{round_no}"
        shown = await _openings(self.engine, batch * self.config.openings, tag, audience.community)
        for i, (prompt, generation_id, text) in enumerate(shown):
            verdict = audience.taste(text, prompt=prompt)
            if verdict is None:
                continue
            message = f"{tag}-{i}"
            await self.engine.link_message(message, generation_id)
            await self.engine.record_reaction(
                message, f"{audience.name}-user-{i % 50}", "👍" if verdict else "👎", added=True
            )

    async def measure(
        self, audience: Audience, lineage: str | None, round_no: int
    ) -> dict[str, Any]:
        """Approval (three ways), perplexity and repetition for one lineage's adapter and
        reward model (a community's own, else the shared one)."""
        engine = self.engine
        n = self.config.best_of
        await self.write_candidates([lineage], round_no)
        assert self.base_candidates is not None
        adapter = await engine.registry.serving(lineage)
        key = adapter.name if adapter else BASE_ADAPTER
        candidates, ppl = self.measured[key]
        scorer = await engine.rewards.scorer(lineage, memos=self.features) if n > 1 else None
        judge = await engine.rewards.serving_version(lineage) if scorer else None
        served = await self.ranked(candidates, scorer, (key, judge))
        base_ranked = await self.ranked(self.base_candidates, scorer, (BASE_ADAPTER, judge))
        row: dict[str, Any] = {"round": round_no}
        row["approval"], row["votes"] = _approval(audience.taste, self.prompts, served)
        row["approval_adapter_only"], _ = _approval(
            audience.taste, self.prompts, [c[0] for c in candidates]
        )
        row["approval_best_of_only"], _ = _approval(audience.taste, self.prompts, base_ranked)
        row["repeat4"], row["distinct2"] = repetition(served)
        row["best_of"] = n if scorer is not None else 1
        row["perplexity"] = ppl
        return row

    async def write_candidates(self, lineages: list[str | None], round_no: int) -> None:
        """The candidates (and perplexity) of each adapter these lineages serve that has
        none yet, the adapters' written at once (the scheduler batches their rows
        together, as it would several servers' turns)."""
        n = self.config.best_of
        if self.base_candidates is None:  # the base model's: written once
            self.base_candidates = await self.candidates(None, "base", n)
            self.measured[BASE_ADAPTER] = (
                self.base_candidates,
                await asyncio.to_thread(self.perplexity, None),
            )
        serving = [await self.engine.registry.serving(lineage) for lineage in lineages]
        new = list(
            {a.name: a for a in serving if a is not None and a.name not in self.measured}.values()
        )
        written = await asyncio.gather(
            *(self.candidates((a.name, str(a.path)), f"{a.name}-r{round_no}", n) for a in new)
        )
        for adapter, candidates in zip(new, written, strict=True):
            self.measured[adapter.name] = (
                candidates,
                await asyncio.to_thread(self.perplexity, adapter),
            )

    async def candidates(
        self, adapter: tuple[str, str] | None, tag: str, n: int
    ) -> list[list[str]]:
        """`n` openings per evaluation prompt through the serving path (the scheduler
        writes them with one shared prefill), with their seeds fixed per prompt so every
        adapter is measured on the same draws."""
        engine = self.engine
        params = self.settings.sampling.replace(best_of=1)
        narrator = engine.narrator
        limit = asyncio.Semaphore(max(1, 64 // n))
        progress = Progress(f"{tag} samples", len(self.prompts), say=_progress, unit="story")

        async def one(i: int, premise: str) -> list[str]:
            async with limit:
                prompt = engine.opening_prompt(premise, params)
                made = await narrator.narrate_candidates(
                    prompt,
                    params.replace(seed=self.config.seed * 100_003 + i * 11),
                    n,
                    channel=f"{tag}-{i % 64}",
                    adapter=adapter[0] if adapter else BASE_ADAPTER,
                    adapter_path=adapter[1] if adapter else None,
                )
                progress.advance()
                return [m.text for m in made]

        with progress:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(self.prompts))))

    async def ranked(
        self, candidates: list[list[str]], scorer: Any, key: tuple[str, Any]
    ) -> list[str]:
        """Each prompt's candidate the reward model scores best (the first without one);
        every prompt's candidates are scored in one call, batched, and once per
        (candidates, reward model): `key` (the shared arm's rows share both)."""
        if scorer is None:
            return [c[0] for c in candidates]
        cache_key = (key[0], getattr(key[1], "version", key[1]))
        if cache_key not in self.rankings:
            self.rankings[cache_key] = await self._ranked(candidates, scorer)
        return self.rankings[cache_key]

    async def _ranked(self, candidates: list[list[str]], scorer: Any) -> list[str]:
        prompts = [self.engine.opening_prompt(premise) for premise in self.prompts]
        flat = [(p, t) for p, texts in zip(prompts, candidates, strict=True) for t in texts]
        scores = iter(await scorer([p for p, _ in flat], [t for _, t in flat]))
        chosen = []
        for texts in candidates:
            mine = [next(scores) for _ in texts]
            chosen.append(texts[max(range(len(texts)), key=lambda i: mine[i])])
        return chosen

    def perplexity(self, adapter: Any) -> float:
        """The held-out perplexity of the base model or `adapter`: the figure its round
        measured on the same stories and weights when this process has it
        (`PERPLEXITIES`), else measured here."""
        from ..learning.best_of import base_copy

        if self._ppl_model is None:
            self._ppl_model = base_copy(self.engine.narrator.local_model)
        model = self._ppl_model

        def measure() -> float:
            if adapter is not None:
                model.load_adapter(adapter.name, str(adapter.path))
            name = adapter.name if adapter is not None else None
            return perplexity(model.model, model.tokenizer, name, self.texts)

        path = adapter.path if adapter is not None else None
        return PERPLEXITIES.get(model, path, self.texts, measure)


async def _openings(
    engine: Any, prompts: list[str], tag: str, community: str | None
) -> list[tuple[str, int, str]]:
    """Start one story per prompt (concurrently: the scheduler batches them)."""
    author = Author("sim-author", "Sim")
    limit = asyncio.Semaphore(64)
    progress = Progress(f"{tag} openings", len(prompts), say=_progress, unit="story")

    async def one(i: int, prompt: str) -> tuple[str, int, str]:
        async with limit:
            result = await engine.start_story(
                f"{tag}-{i}", prompt, author=author, community=community
            )
            progress.advance()
            return prompt, result.generation_id, result.text

    with progress:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def _approval(taste: Taste, prompts: Sequence[str], texts: Sequence[str]) -> tuple[float, int]:
    votes = [taste(text, prompt=prompt) for prompt, text in zip(prompts, texts, strict=True)]
    up, down = votes.count(True), votes.count(False)
    return (up / (up + down) if up + down else 0.0), up + down


def _progress(line: str) -> None:
    print("  " + line, file=sys.stderr, flush=True)


def _print_row(name: str, lineage: str | None, row: dict[str, Any]) -> None:
    arm = f"{name} ({'own' if lineage else 'shared'}) " if name else ""
    print(
        f"{arm}round {row['round']}: approval {row['approval']:.3f}"
        f" (adapter only {row['approval_adapter_only']:.3f},"
        f" best-of-{row['best_of']} only {row['approval_best_of_only']:.3f}; {row['votes']} votes)"
        f" · ppl {row['perplexity']:.2f} · distinct-2 {row['distinct2']:.3f}"
        f" · repeat-4 {row['repeat4']:.3f} · promoted {row['promoted']}"
        f" · {row['seconds']:.0f} s" + (f" · {row['gate']}" if row.get("gate") else ""),
        flush=True,
    )
