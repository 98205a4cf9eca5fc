"""A process that dies at a chosen step of registering and promoting an adapter, or of a
whole learning round: `os._exit(9)` right there, so no `finally`, `except` or exit
handler runs and no buffer is flushed, as with kill -9 or a power cut. The tests in
test_crash_recovery.py start it, then open the same files and check that the next
round runs.

    python tests/helpers/crash_child.py registry STEP DB ADAPTER_DIR
    python tests/helpers/crash_child.py round STEP DB ADAPTER_DIR MODEL_DIR

STEP is where it dies:
  writing    while the adapter's files are being written (its temporary directory)
  renamed    right after the version directory is renamed into place, before its
             registry row is inserted
  inserted   after the row is inserted, before the version is promoted
  promoting  inside promote's transaction: the old version retired, the new one not
             yet promoted, nothing committed
  promoted   right after promote (in a round: before the run is recorded as finished)

`registry` registers and promotes a new version with the registry alone, as a round
does (holding the round lock); `round` runs a real round (`run_round`) on the tiny
model saved in MODEL_DIR and the feedback in DB.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from storyengine.learning import registry as adapters
from storyengine.learning.registry import AdapterRegistry, round_lock
from storyengine.storage.store import Store

STEPS = ("writing", "renamed", "inserted", "promoting", "promoted")


def die() -> None:
    os._exit(9)


def inject(step: str) -> None:
    """Patch the code at `step` to die there."""
    if step == "renamed":
        replace = os.replace

        def replace_then_die(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if Path(src).name.startswith(".tmp-"):
                die()

        adapters.os.replace = replace_then_die  # type: ignore[attr-defined]
    elif step == "inserted":

        async def die_before(self, version):
            die()

        AdapterRegistry.promote = die_before  # type: ignore[method-assign]
    elif step == "promoting":
        import aiosqlite

        execute = aiosqlite.Connection.execute

        async def execute_or_die(self, sql, *args, **kwargs):
            if sql.startswith("UPDATE adapters SET status = 'promoted'"):
                die()  # the UPDATE that retired the old version is not committed
            return await execute(self, sql, *args, **kwargs)

        aiosqlite.Connection.execute = execute_or_die  # type: ignore[method-assign]
    elif step == "promoted":
        promote = AdapterRegistry.promote

        async def promote_then_die(self, version):
            await promote(self, version)
            die()

        AdapterRegistry.promote = promote_then_die  # type: ignore[method-assign]


def fake_adapter(directory: Path, *, die_midway: bool = False) -> None:
    """Files in peft's layout; the registry treats their content as opaque."""
    (directory / "adapter_model.safetensors").write_bytes(b"weights " * 512)
    if die_midway:
        die()
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA"}', encoding="utf-8")


async def registry_steps(step: str, db: Path, root: Path) -> None:
    store = await Store(db).open()
    with round_lock(root):
        registry = await AdapterRegistry(store, root).open()
        version = await registry.register(
            lambda d: fake_adapter(d, die_midway=step == "writing"), method="kto"
        )
        await registry.promote(version.version)


async def round_steps(step: str, db: Path, root: Path, model_dir: Path) -> None:
    from storyengine.config import Settings
    from storyengine.learning.rounds import run_round

    if step == "writing":
        from peft import PeftModel

        save = PeftModel.save_pretrained

        def save_then_die(self, directory, *args, **kwargs):
            save(self, directory, *args, **kwargs)
            die()  # the weights are written, taleweaver.json not yet

        PeftModel.save_pretrained = save_then_die  # type: ignore[method-assign]
    settings = Settings(db_path=db, adapter_dir=root, base_model=str(model_dir), device="cpu")
    await run_round(settings, round_config(), say=lambda line: print(line, flush=True))


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


def main(argv: list[str]) -> None:
    kind, step, db, root = argv[:4]
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    inject(step)
    if kind == "registry":
        asyncio.run(registry_steps(step, Path(db), Path(root)))
    else:
        asyncio.run(round_steps(step, Path(db), Path(root), Path(argv[4])))
    print(f"finished without reaching the crash point {step!r}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
