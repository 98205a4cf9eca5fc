"""`storyengine chat`: a whole story session in the terminal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any, TextIO

from ..config import Settings
from ..errors import InvalidInput, StoryError
from ..records import Author
from .common import read_file, say_loading, write_bytes, write_text

log = logging.getLogger(__name__)


CHAT_HELP = """\
Commands (anything else you type is your line; the storyteller continues it):
  /start PREMISE              open a story with PREMISE and let the storyteller begin
  /continue [TEXT]            add TEXT (optional) and let the storyteller continue
  /retry                      write the storyteller's last turn again
  /alts                       list the alternatives written for the last turn
  /pick N                     make alternative N the story's turn (a preference, learned from)
  /swipe [prev|next]          show the last turn's previous (or next) alternative in its place
  /good, /bad                 like or dislike the storyteller's last turn (learned from)
  /undo                       take back the last turn (your line and its reply)
  /memory TEXT                what the storyteller should always remember ("/memory" clears)
  /note TEXT                  author's note: steers the next turns ("/note" clears)
  /lore NAME: TRIGGERS: TEXT  a character or place, recalled when a trigger word appears
  /lore                       list lore cards;  /unlore NAME  removes one
  /character [NAME] [HINT]    the storyteller drafts a character;  /setting [HINT]  a place
  /keep                       keep the last draft as a lore card
  /import FILE                a SillyTavern card (JSON, PNG) or world info, or a NovelAI
                              lorebook, into the story's lore
  /export-lore FILE           the story's lore as SillyTavern world info
  /settings [preset=NAME] [temperature=T] [length=N] [best_of=N]   this channel's style
  /recap                      the story so far, in brief
  /context                    what the storyteller saw for its last turn, part by part
  /export [FILE]              the story as Markdown (to FILE, or printed)
  /save FILE                  the story as a story file;  /load FILE  starts one here
  /illustrate FILE [TURN]     a picture for turn TURN (default the last) into FILE
                              (needs STORY_IMAGE_MODEL or STORY_IMAGE_URL)
  /end                        end the story
  /help                       this help;  /quit  leave (the story stays open)
Ctrl-C while the storyteller writes stops it."""


class _Printer:
    """Prints a turn as it grows; the final text may revise the last sentence."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = ""

    async def progress(self, text: str) -> None:
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text

    def finish(self, text: str) -> None:
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :] + "\n\n")
        else:
            self.out.write(f"\n(revised)\n{text}\n\n")
        self.out.flush()
        self.shown = ""


async def run_chat(args: argparse.Namespace, settings: Settings) -> int:
    from ..story.engine import StoryEngine

    out = sys.stdout
    interactive = sys.stdin.isatty()
    channel, author = args.channel, Author(id=f"terminal:{args.author}", name=args.author)
    print("Loading the storyteller…", file=sys.stderr)
    say_loading(settings)
    engine = await StoryEngine(settings, adapter=args.adapter).start()
    loop = asyncio.get_running_loop()
    if interactive:
        loop.add_signal_handler(signal.SIGINT, lambda: engine.stop(channel) or _quit())
    try:
        story = await engine.find_story(channel)
        if story is None:
            out.write(
                f"No story in '{channel}' yet. Type /start PREMISE to begin, /help for help.\n"
            )
        else:
            view = await engine.view(channel)
            out.write(f"Resuming the story in '{channel}' ({len(view.turns)} turns).\n")
            out.write((view.turns[-1].text if view.turns else story.premise) + "\n\n")
        out.flush()
        session = _ChatSession(engine, channel, author, out)
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if not await session.handle(line):
                    break
            except StoryError as exc:
                out.write(f"! {exc}\n")
                out.flush()
    finally:
        await engine.close()
    return 0


def _quit() -> None:
    raise KeyboardInterrupt


class _ChatSession:
    """Turns chat lines into engine calls and prints the results."""

    def __init__(self, engine: Any, channel: str, author: Author, out: TextIO) -> None:
        self.engine = engine
        self.channel = channel
        self.author = author
        self.draft: Any = None
        """The last card `/character` or `/setting` drafted, for `/keep`."""
        self.out = out
        self.printer = _Printer(out)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def handle(self, line: str) -> bool:
        """Handle one line. Returns False to end the session."""
        e, ch = self.engine, self.channel
        if not line.startswith("/"):
            line = "/continue " + line
        command, _, arg = line[1:].partition(" ")
        command, arg = command.lower(), arg.strip()
        p = self.printer.progress
        if command in {"quit", "exit", "q"}:
            return False
        if command == "help":
            self.say(CHAT_HELP)
        elif command == "start":
            if not arg:
                self.say("! Give a premise: /start Once upon a time, a little fox...")
                return True
            self.say(arg)
            result = await e.start_story(ch, arg, author=self.author, on_progress=p)
            self.printer.finish(result.text)
        elif command == "continue":
            result = await e.continue_story(ch, self.author, arg or None, on_progress=p)
            self.printer.finish(result.text)
        elif command == "retry":
            result = await e.retry(ch, by=self.author, on_progress=p)
            self.printer.finish(result.text)
        elif command == "alts":
            alts = await e.alternatives(ch)
            if not alts:
                self.say("No alternatives yet: /retry writes one.")
            for i, turn in enumerate(alts, 1):
                mark = "*" if turn.status == "active" else " "
                self.say(f"{mark}{i}. {turn.text}")
        elif command == "swipe":
            if arg not in ("", "prev", "next"):
                raise InvalidInput("Usage: /swipe [prev|next]")
            view = await e.view(ch)  # the engine says whether the last turn swipes
            position = view.turns[-1].position if view.turns else 0
            step = 1 if arg == "next" else -1
            swipe = await e.swipe(ch, view.story.id, position, step, by=self.author)
            self.say(f"({swipe.number}/{swipe.total}) {swipe.text}")
        elif command == "pick":
            if not arg.isdigit():
                self.say("! Usage: /pick N (see /alts)")
                return True
            turn = await e.choose_alternative(ch, int(arg), by=self.author)
            self.say(turn.text)
        elif command in ("good", "bad"):
            await e.rate(ch, self.author, liked=command == "good")
            self.say("Noted: 👍." if command == "good" else "Noted: 👎.")
        elif command == "undo":
            removed = await e.undo(ch)
            self.say(f"Undone: {len(removed)} turn(s).")
        elif command == "memory":
            await e.set_memory(ch, arg)
            self.say("Memory set." if arg else "Memory cleared.")
        elif command == "note":
            await e.set_authors_note(ch, arg)
            self.say("Author's note set." if arg else "Author's note cleared.")
        elif command == "lore":
            await self._lore(arg)
        elif command == "unlore":
            await e.remove_lore(ch, arg)
            self.say(f"Removed lore card {arg}.")
        elif command == "settings":
            await self._settings(arg)
        elif command == "recap":
            self.say(await e.recap(ch))
        elif command == "context":
            self.say((await e.context(ch)).describe())
        elif command == "export":
            markdown = await e.export_markdown(ch)
            if arg:
                await asyncio.to_thread(write_text, arg, markdown)
                self.say(f"Exported to {arg}.")
            else:
                self.say(markdown)
        elif command in ("character", "setting"):
            name, _, hint = arg.partition(" ") if command == "character" else ("", "", arg)
            self.draft = await e.draft_card(ch, command, name=name or None, hint=hint or None)
            self.say(f"{self.draft.name}: {self.draft.text}\n(/keep adds it to the lore)")
        elif command == "keep":
            if self.draft is None:
                raise InvalidInput("Nothing to keep: /character or /setting drafts a card.")
            card = await e.add_lore(
                ch, self.draft.name, self.draft.triggers, self.draft.text, by=self.author
            )
            self.draft = None
            self.say(f"Kept lore card {card.name}.")
        elif command == "import":
            if not arg:
                raise InvalidInput("Usage: /import FILE")
            raw = await asyncio.to_thread(read_file, arg, "lorebook")
            self.say((await e.import_lore(ch, raw, by=self.author)).describe())
        elif command == "export-lore":
            if not arg:
                raise InvalidInput("Usage: /export-lore FILE")
            await asyncio.to_thread(write_text, arg, await e.lore_as_world_info(ch))
            self.say(f"Exported the lore to {arg}.")
        elif command == "save":
            if not arg:
                raise InvalidInput("Usage: /save FILE")
            await asyncio.to_thread(write_text, arg, await e.save_story(ch))
            self.say(f"Saved to {arg}.")
        elif command == "load":
            if not arg:
                raise InvalidInput("Usage: /load FILE")
            raw = await asyncio.to_thread(read_file, arg, "story")
            view = await e.load_story(ch, raw, author=self.author)
            self.say(f'Loaded the story "{view.story.premise}" ({len(view.turns)} turns).')
            if view.turns:
                self.say(view.turns[-1].text)
        elif command == "illustrate":
            await self._illustrate(arg)
        elif command == "end":
            story = await e.end_story(ch)
            self.say(
                f"The story has ended. (/export still works; /start begins a new one.) [{story.id}]"
            )
        else:
            self.say(f"! Unknown command /{command}. Type /help.")
        return True

    async def _illustrate(self, arg: str) -> None:
        path, _, turn = arg.partition(" ")
        if not path or (turn.strip() and not turn.strip().isdigit()):
            raise InvalidInput("Usage: /illustrate FILE [TURN]")
        order = await self.engine.order_picture(
            self.channel, int(turn) if turn.strip() else None, by=self.author
        )
        self.say(f"Drawing turn {order.turn} of {order.turns}: {order.prompt}")

        def progress(step: int, steps: int) -> None:
            self.out.write(f"\r  step {step}/{steps}")
            self.out.flush()

        drawn = await self.engine.draw_picture(order, on_progress=progress)
        await asyncio.to_thread(write_bytes, path, drawn.picture.data)
        self.say(f"\nSaved the picture ({drawn.picture.media_type}) to {path}.")

    async def _lore(self, arg: str) -> None:
        if not arg:
            cards = await self.engine.lore(self.channel)
            if not cards:
                self.say("No lore cards. Add one: /lore Pip: pip, mouse: A brave little mouse.")
            for card in cards:
                self.say(f"{card.name} ({', '.join(card.triggers)}): {card.text}")
            return
        parts = [p.strip() for p in arg.split(":", 2)]
        if len(parts) != 3:
            self.say("! Usage: /lore NAME: TRIGGER, TRIGGER: TEXT")
            return
        card = await self.engine.add_lore(self.channel, parts[0], parts[1], parts[2])
        self.say(f"Lore card {card.name} saved (triggers: {', '.join(card.triggers)}).")

    async def _settings(self, arg: str) -> None:
        changes: dict[str, Any] = {}
        names = {
            "preset": ("preset_name", str),
            "temperature": ("temperature", float),
            "length": ("max_new_tokens", int),
            "best_of": ("best_of", int),
        }
        for pair in arg.split():
            key, _, value = pair.partition("=")
            if key not in names or not value:
                self.say("! Usage: /settings [preset=NAME] [temperature=T] [length=N] [best_of=N]")
                return
            try:
                changes[names[key][0]] = names[key][1](value)
            except ValueError:
                self.say(f"! {key} must be a number.")
                return
        params = (
            await self.engine.configure_channel(self.channel, **changes)
            if changes
            else (await self.engine.sampling_for(self.channel))
        )
        self.say(
            f"temperature={params.temperature} top_p={params.top_p} top_k={params.top_k} "
            f"length={params.max_new_tokens} beams={params.num_beams} best_of={params.best_of}"
        )
