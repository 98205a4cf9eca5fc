"""`storyengine db migrate|status|backup`."""

from __future__ import annotations

import argparse
import asyncio
import logging

from ..config import Settings
from ..errors import InvalidInput

log = logging.getLogger(__name__)


async def run_db(args: argparse.Namespace, settings: Settings) -> int:
    from ..storage.store import Store, backup_database

    if args.action == "backup":
        if args.file is None:
            raise InvalidInput("db backup needs a FILE to write the backup to")
        await asyncio.to_thread(backup_database, settings.db_path, args.file)
        print(f"backed up {settings.db_path} to {args.file}")
        return 0
    if args.file is not None:
        raise InvalidInput(f"db {args.action} takes no FILE")
    # `status` looks, and never creates a database where there was none.
    store = await Store(settings.db_path).open(migrate=False, create=args.action != "status")
    try:
        if args.action == "migrate":
            applied = await store.migrate()
            for m in applied:
                print(f"applied {m.version:04d}_{m.name}")
            if not applied:
                print(f"{settings.db_path}: up to date")
        for status in await store.migration_status():
            state = f"applied {status.applied_at}" if status.applied_at else "pending"
            print(f"{status.version:04d}_{status.name}: {state}")
    finally:
        await store.close()
    return 0
