"""Backups: `Store.backup` / `storyengine db backup` with SQLite's online backup API
while another connection writes, the automatic backup before a migration, and `db
status` on a path where there is no database."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading

import pytest

from storyengine.cli.main import main as cli_main
from storyengine.errors import InvalidInput
from storyengine.storage import database as store_module
from storyengine.storage.store import Store, load_migrations


class Writer(threading.Thread):
    """Another connection that commits one row at a time until stopped, counting the
    rows it has committed."""

    def __init__(self, path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.committed = 0
        self.enough = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 5000")
        try:
            while not self.stop.is_set():
                n = self.committed + 1
                db.execute("INSERT INTO communities (id, learning) VALUES (?, 0)", (f"c{n:06d}",))
                self.committed = n  # autocommit: the row is committed
                if n >= 200:
                    self.enough.set()
        finally:
            db.close()


async def test_a_backup_taken_while_another_connection_writes_holds_every_committed_row(
    tmp_path,
):
    db = tmp_path / "live.db"
    store = await Store(db).open()
    writer = Writer(db)
    writer.start()
    try:
        assert writer.enough.wait(60)
        committed_before = writer.committed
        # A plain copy of the file misses what is still in the write-ahead log...
        shutil.copy(db, tmp_path / "copied.db")
        # ...the backup API does not, while the writer goes on.
        target = await store.backup(tmp_path / "backup.db")
    finally:
        writer.stop.set()
        writer.join(30)
    await store.close()

    assert target == tmp_path / "backup.db"
    assert not (tmp_path / "backup.db.partial").exists()
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file
        ids = [r[0] for r in copy.execute("SELECT id FROM communities ORDER BY id")]
        tables = {r[0] for r in copy.execute("SELECT name FROM sqlite_master")}
    # Every row committed before the backup began, and no gap: a consistent snapshot.
    assert len(ids) >= committed_before
    assert ids == [f"c{n:06d}" for n in range(1, len(ids) + 1)]
    assert {"stories", "generations", "schema_migrations"} <= tables
    with sqlite3.connect(tmp_path / "copied.db") as copied:
        try:
            in_copy = copied.execute("SELECT COUNT(*) FROM communities").fetchone()[0]
        except sqlite3.OperationalError:  # not even the table: it is still in the log
            in_copy = 0
    assert in_copy < committed_before  # why copying the file is not a backup


async def test_a_backup_never_overwrites_and_needs_a_database(tmp_path):
    store = await Store(tmp_path / "a.db").open()
    (tmp_path / "taken.db").write_text("keep me")
    with pytest.raises(InvalidInput, match="already exists"):
        await store.backup(tmp_path / "taken.db")
    assert (tmp_path / "taken.db").read_text() == "keep me"
    with pytest.raises(InvalidInput, match="another file"):
        await store.backup(tmp_path / "a.db")
    await store.close()
    with pytest.raises(InvalidInput, match="no database there"):
        store_module.backup_database(tmp_path / "missing.db", tmp_path / "b.db")
    assert not (tmp_path / "missing.db").exists()


async def test_migrating_a_database_with_a_schema_backs_it_up_first(tmp_path, monkeypatch, caplog):
    db = tmp_path / "stories.db"
    every = load_migrations()
    monkeypatch.setattr(store_module, "load_migrations", lambda dialect="sqlite": every[:-1])
    store = await Store(db).open()
    assert not list(tmp_path.glob("*.bak"))  # a new database: nothing to back up
    await store.create_story("c1", "Once upon a time.", genre=None, mode="solo", created_by="1")
    await store.close()

    monkeypatch.setattr(store_module, "load_migrations", lambda dialect="sqlite": every)
    with caplog.at_level(logging.WARNING, logger="storyengine.storage.store"):
        store = await Store(db).open()  # applies the last migration
    await store.close()
    backups = list(tmp_path.glob("stories.db.schema-*.bak"))
    assert len(backups) == 1
    old = every[-2].version
    assert backups[0].name.startswith(f"stories.db.schema-{old:04d}.")
    with sqlite3.connect(backups[0]) as copy:
        assert copy.execute("SELECT premise FROM stories").fetchall() == [("Once upon a time.",)]
        versions = [r[0] for r in copy.execute("SELECT version FROM schema_migrations")]
    assert max(versions) == old  # the schema as it was before the upgrade
    said = [r.getMessage() for r in caplog.records if "backed up" in r.getMessage()]
    assert said == [
        f"backed up {db} to {backups[0]} before applying migration(s) "
        f"{every[-1].version:04d}_{every[-1].name}"
    ]

    store = await Store(db).open()  # nothing pending: no new backup
    await store.close()
    assert len(list(tmp_path.glob("*.bak"))) == 1


def test_db_status_on_a_missing_path_says_so_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "stories.db"
    assert cli_main(["db", "status", "--db", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no database there (nothing was created)" in err and str(missing) in err
    assert not missing.exists() and not missing.parent.exists()


def test_db_backup_command(tmp_path, capsys):
    db = tmp_path / "s.db"
    assert cli_main(["db", "migrate", "--db", str(db)]) == 0
    assert cli_main(["db", "backup", str(tmp_path / "b.db"), "--db", str(db)]) == 0
    assert f"backed up {db} to {tmp_path / 'b.db'}" in capsys.readouterr().out
    with sqlite3.connect(tmp_path / "b.db") as copy:
        assert copy.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(
            load_migrations()
        )
    assert cli_main(["db", "backup", "--db", str(db)]) == 2  # no FILE
    assert "needs a FILE" in capsys.readouterr().err
