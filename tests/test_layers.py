"""Which part may reach which: read from the sources, so a shortcut fails here first."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_and_attributes(path: Path) -> tuple[set[str], set[str]]:
    """The modules a file imports, and every `a.b` attribute chain it spells."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules: set[str] = set()
    chains: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(("." * node.level) + node.module)
        elif isinstance(node, ast.Attribute):
            chains.add(ast.unparse(node))
    return modules, chains


def test_storyengine_never_imports_discord_or_the_bot():
    for path in (ROOT / "storyengine").rglob("*.py"):
        modules, _ = imports_and_attributes(path)
        assert not {m for m in modules if m.split(".")[0] in {"discord", "bot"}}, path


def test_the_bot_asks_the_engine_and_never_reaches_into_it():
    """The engine is a façade: the bot never touches its store, registry or reward
    source (what a server's admins need is `engine.learning`)."""
    inner = ("engine.store", "engine.registry", "engine.rewards", "engine._")
    for path in (ROOT / "bot").rglob("*.py"):
        _, chains = imports_and_attributes(path)
        reached = {c for c in chains if any(part in c for part in inner)}
        assert not reached, (path.name, reached)


def test_the_service_and_the_remote_generator_know_nothing_of_stories():
    """`serve` and `remote` are serving: no story rules, no database of stories."""
    for name in ("serve.py", "remote.py", "generators.py"):
        modules, _ = imports_and_attributes(ROOT / "storyengine" / name)
        story_side = {".engine", ".narrator", ".memory", ".store", ".rounds", ".reward"}
        assert not (modules & story_side), (name, modules & story_side)
