"""`taleweaver-bot` / `python -m bot`: start the Discord bot."""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "taleweaver-bot: the Discord front end is not built yet; use `storyengine chat` "
        "to tell a story in the terminal.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
