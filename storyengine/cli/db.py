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
        if settings.db_url:
            raise InvalidInput(
                f"back a PostgreSQL database up with pg_dump: pg_dump '{settings.database_shown}'"
            )
        await asyncio.to_thread(backup_database, settings.db_path, args.file)
        print(f"backed up {settings.db_path} to {args.file}")
        return 0
    if args.action == "copy":
        return await _copy(settings, args.to)
    if args.file is not None:
        raise InvalidInput(f"db {args.action} takes no FILE")
    # `status` looks, and never creates a database where there was none.
    store = await Store(settings.database).open(migrate=False, create=args.action != "status")
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


async def _copy(settings: Settings, to: str | None) -> int:
    """`db copy --to URL`: this database's rows into another (new, or migrated and
    empty), checked table by table."""
    from ..storage.store import Store, copy_database

    if not to:
        raise InvalidInput("db copy needs --to: a postgresql:// URL or a SQLite file")
    if not settings.has_database:
        raise InvalidInput(f"{settings.database_shown}: no database there to copy")
    source = await Store(settings.database).open(create=False)
    try:
        target = await Store(to).open()
        try:
            copied = await copy_database(source, target)
        finally:
            await target.close()
    finally:
        await source.close()
    print(f"copied {sum(copied.values())} rows in {len(copied)} tables; every count checked")
    return 0
