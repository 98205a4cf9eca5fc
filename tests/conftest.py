"""Shared fixtures: real models (the bundled one, and tiny random GPT-2s built in code),
real SQLite files in temporary directories. Nothing is downloaded.

The folders mirror the package (story, serving, storage, learning, bot, cli, bench), and
each test is marked with its folder's name: `pytest -m serving` runs the serving tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storyengine.config import Settings
from storyengine.serving.modeling import LoadedModel, load_model
from tests.helpers.models import make_tiny_lora_model, make_tiny_model


@pytest.fixture(scope="session")
def tiny_lora_model() -> LoadedModel:
    return make_tiny_lora_model()


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return make_tiny_model()


@pytest.fixture(scope="session")
def bundled_model() -> LoadedModel:
    """Shared by the whole session: never attach adapters to it (an engine serving a
    promoted adapter does); take `own_bundled_model` for that."""
    return load_model(Settings(device="cpu"))


@pytest.fixture
def own_bundled_model(bundled_model: LoadedModel) -> LoadedModel:
    """A private copy of the bundled model, for tests whose engine loads adapters."""
    import copy

    own = copy.copy(bundled_model)
    own.model = copy.deepcopy(bundled_model.model)
    return own


BOTH_STORES = ("story", "storage")
"""Folders whose tests run once per store; the others on SQLite, unless `TEST_STORES`
says otherwise (`TEST_STORES=postgresql pytest` runs every test on PostgreSQL)."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database" not in metafunc.fixturenames:
        return
    folder = metafunc.definition.path.relative_to(Path(__file__).parent).parts[0]
    default = "sqlite,postgresql" if folder in BOTH_STORES else "sqlite"
    stores = os.environ.get("TEST_STORES", default).split(",")
    metafunc.parametrize("database", [s.strip() for s in stores], indirect=True)


@pytest.fixture
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Path | str]:
    """Where a test's stories are kept: a SQLite file, or a fresh PostgreSQL database
    (tests/helpers/postgres.py), as `pytest_generate_tests` chose."""
    if request.param == "sqlite":
        yield tmp_path / "stories.db"
        return
    from tests.helpers.postgres import fresh_database

    async with fresh_database() as url:
        yield url


def settings_for(database: Path | str, tmp_path: Path, **changes: object) -> Settings:
    """Settings that keep the stories in `database` (a SQLite file or a URL)."""
    where = {"db_url": database} if isinstance(database, str) else {"db_path": database}
    return Settings(
        **where,  # type: ignore[arg-type]
        adapter_dir=tmp_path / "adapters",
        device="cpu",
        **changes,  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(database: Path | str, tmp_path: Path) -> Settings:
    # Short continuations keep the engine tests quick on two CPU cores.
    from storyengine.sampling import SamplingParams

    return settings_for(database, tmp_path, sampling=SamplingParams(max_new_tokens=32, seed=7))


@pytest.fixture
async def engine(settings: Settings, bundled_model: LoadedModel) -> AsyncIterator[object]:
    """An engine on the bundled model with the batching scheduler, as production serves."""
    from storyengine.serving.scheduler import BatchingGenerator
    from storyengine.story.engine import StoryEngine

    async with StoryEngine(settings, generator=BatchingGenerator(bundled_model)) as engine:
        yield engine


@pytest.fixture
async def tiny_engine(database: Path | str, tmp_path: Path) -> AsyncIterator[object]:
    """An engine on the tiny random GPT-2 with the batching scheduler (as production
    serves): for tests of story rules, where the words do not matter."""
    from storyengine.sampling import SamplingParams
    from storyengine.serving.scheduler import BatchingGenerator
    from storyengine.story.engine import StoryEngine

    settings = settings_for(database, tmp_path, sampling=SamplingParams(max_new_tokens=8, seed=1))
    async with StoryEngine(settings, generator=BatchingGenerator(make_tiny_model())) as engine:
        yield engine


LAYERS = ("story", "serving", "storage", "learning", "bot", "cli", "bench")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(root).parts[0]
        if folder in LAYERS:
            item.add_marker(folder)
