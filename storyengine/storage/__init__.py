"""Storage: the one place SQL lives (SQLite through aiosqlite), with its migrations.

It imports nothing from `story`, `serving` or `learning`; they reach it through `Store`.
"""
