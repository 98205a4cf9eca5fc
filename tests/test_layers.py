"""Which part may reach which: read from the sources, so a shortcut fails here first.

The map (README, "How it works"):

    storyengine/                 shared vocabulary: config, options, errors, records,
                                 sampling, saves, safety, text, progress, version
      serving/   → shared        text from a model; knows no stories, SQL or training
      storage/   → shared        every SQL statement
      learning/  → serving, storage, shared
      story/     → learning, serving, storage, shared
      bench/, cli/               may use everything
    bot/         → storyengine's public names and shared vocabulary, nothing deeper
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "storyengine"
SHARED = {"config", "errors", "records", "sampling", "saves", "safety", "text"}
SHARED |= {"progress", "version", "options"}
LAYERS = {"serving", "storage", "learning", "story", "bench", "cli", "migrations"}
MAY_IMPORT = {
    "shared": set(),
    "serving": set(),
    "storage": set(),
    "learning": {"serving", "storage"},
    "story": {"learning", "serving", "storage"},
    "bench": LAYERS,
    "cli": LAYERS,
}


def imports_and_attributes(path: Path) -> tuple[set[str], set[str]]:
    """The modules a file imports (absolute: `storyengine.x.y`), and every `a.b`
    attribute chain it spells."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    modules: set[str] = set()
    chains: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                base += node.module.split(".") if node.module else []
            else:
                base = (node.module or "").split(".")
            if node.module:
                modules.add(".".join(base))
            else:  # `from . import a, b` imports modules a and b
                modules |= {".".join([*base, alias.name]) for alias in node.names}
        elif isinstance(node, ast.Attribute):
            chains.add(ast.unparse(node))
    return modules, chains


def layer_of(module: str) -> str | None:
    """`storyengine.story.engine` → story; `storyengine.config` → shared."""
    parts = module.split(".")
    if parts[0] != "storyengine" or len(parts) < 2:
        return None
    if parts[1] in LAYERS:
        return parts[1]
    return "shared" if parts[1] in SHARED else parts[1]


def sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_place_on_the_map():
    for path in sources(PACKAGE):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if path.name in {"__init__.py", "__main__.py"} and path.parent == PACKAGE:
            continue
        assert layer_of(module) in MAY_IMPORT | {"migrations": set()}, module


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_each_layer_imports_only_what_the_map_allows(layer):
    folder = PACKAGE if layer == "shared" else PACKAGE / layer
    files = [p for p in sources(folder) if layer != "shared" or p.stem in SHARED]
    assert files
    allowed = MAY_IMPORT[layer] | {layer, "shared"}
    for path in files:
        modules, _ = imports_and_attributes(path)
        reached = {layer_of(m) for m in modules} - {None}
        assert reached <= allowed, (path.relative_to(ROOT), reached - allowed)


def test_storyengine_never_imports_discord_or_the_bot():
    for path in sources(PACKAGE):
        modules, _ = imports_and_attributes(path)
        assert not {m for m in modules if m.split(".")[0] in {"discord", "bot"}}, path


def test_the_bot_uses_only_the_public_api_and_the_shared_vocabulary():
    for path in sources(ROOT / "bot"):
        modules, _ = imports_and_attributes(path)
        deeper = {m for m in modules if m.startswith("storyengine.") and layer_of(m) != "shared"}
        assert not deeper, (path.relative_to(ROOT), deeper)


def test_the_bots_public_names_exist():
    import storyengine

    for name in storyengine.__all__:
        assert getattr(storyengine, name) is not None, name


def test_the_bot_asks_the_engine_and_never_reaches_into_it():
    """The engine is a façade: the bot never touches its store, registry or reward
    source (what a server's admins need is `engine.learning`)."""
    inner = ("engine.store", "engine.registry", "engine.rewards", "engine._")
    for path in sources(ROOT / "bot"):
        _, chains = imports_and_attributes(path)
        reached = {c for c in chains if any(part in c for part in inner)}
        assert not reached, (path.name, reached)


def test_a_module_of_the_flat_layout_still_imports_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("storyengine.store", None)
    with pytest.warns(DeprecationWarning, match="storage.store"):
        old = importlib.import_module("storyengine.store")
    from storyengine.storage import store

    assert old is store


def test_every_sql_statement_lives_in_storage():
    statement = re.compile(r"\s*(SELECT |INSERT |UPDATE \w+ SET |DELETE FROM |CREATE |PRAGMA )")
    for path in sources(PACKAGE):
        if "storage" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and statement.match(node.value)
        ]
        assert not found, (path.relative_to(ROOT), found[:2])


STORE_MADE_IN = {"story/engine.py", "learning/compare.py", "learning/runs.py"}
"""Where a `Store` is made (the engine, `compare`, a training run): the only modules of
`story` and `learning` that name it. The rest depend on storage's protocols."""


def test_story_and_learning_depend_on_storage_protocols_not_the_store():
    """`story` and `learning` take what they need from `storyengine.storage` (its
    protocols and their vocabulary); `storage.store.Store` only where one is made,
    and never a repository module."""
    import storyengine.storage

    public = set(storyengine.storage.__all__)
    for path in [*sources(PACKAGE / "story"), *sources(PACKAGE / "learning")]:
        where = path.relative_to(PACKAGE).as_posix()
        package = path.relative_to(ROOT).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deep = [a.name for a in node.names if a.name.startswith("storyengine.storage.")]
                assert not deep, (where, deep)
            if not isinstance(node, ast.ImportFrom):
                continue
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            names = {alias.name for alias in node.names}
            if module == "storyengine.storage":
                assert names <= public, (where, names - public)
            elif module == "storyengine.storage.store" and where in STORE_MADE_IN:
                assert names == {"Store"}, (where, names)
            else:
                assert not module.startswith("storyengine.storage."), (where, module)


def test_every_package_ships_in_the_wheel():
    """A package folder missing from pyproject's list is left out of a built wheel (the
    cogs of /story were, once): an installed bot would not start."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("storyengine", "bot")
        for init in (ROOT / top).rglob("__init__.py")
    }
    found |= {
        "storyengine." + ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "migrations").rglob("__init__.py")
    }
    assert found == listed, (found - listed, listed - found)
