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

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `tests.helpers` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storyengine.learning.registry import AdapterRegistry, round_lock
from storyengine.storage.store import Store
from tests.helpers.crash_points import (
    die,
    die_after,
    inject,
    round_config,
    run_child,
    run_round_to_crash,
)

__all__ = ["fake_adapter", "round_config"]  # round_config: as the other tests know it


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

    if step == "writing":  # the weights are written, taleweaver.json not yet
        from peft import PeftModel

        die_after(PeftModel, "save_pretrained")
    settings = Settings(db_path=db, adapter_dir=root, base_model=str(model_dir), device="cpu")
    await run_round_to_crash(settings)


def inject_adapters(step: str) -> None:
    inject(step, AdapterRegistry, temporary=".tmp-", table="adapters")


if __name__ == "__main__":
    run_child(sys.argv[1:], inject_adapters, registry_steps, round_steps)
