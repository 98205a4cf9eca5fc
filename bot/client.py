"""`StoryBot`: the discord.py client. Owns the engine; cogs do the rest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands, tasks

from storyengine import StoryEngine, TrainingSchedule
from storyengine.records import DIRECT_MESSAGES, UNKNOWN_SERVER

from .health import HealthServer, Metrics, interaction_name
from .publish import report_error, safe
from .settings import BotSettings

if TYPE_CHECKING:
    from .cogs.story import StoryCog

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
"""How long a shutdown waits for generations to stop and their messages to say so."""
PRESENCE = "/story start to begin"
"""The bot's status line in the member list: how to begin."""


def absolute(path: str | os.PathLike[str]) -> str:
    """`path` made absolute against the working directory (a string operation)."""
    return os.path.abspath(path)


def intents() -> discord.Intents:
    """Only what the bot uses: guilds (channels, threads) and reactions. No message
    content: everything goes through slash commands, buttons and reactions."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_reactions = True
    wanted.dm_reactions = True
    return wanted


class WorkTracker:
    """Counts the replies being written (publishers, choice offers), so that a shutdown
    can wait for them to finish their last edit before the connection closes."""

    def __init__(self) -> None:
        self.count = 0
        self.waiting = 0
        """How many are waiting for the replies to finish (a shutdown, while it waits)."""
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    @contextlib.asynccontextmanager
    async def tracked(self):  # type: ignore[no-untyped-def]
        self.begin()
        try:
            yield
        finally:
            self.end()

    async def idle(self) -> None:
        self.waiting += 1
        try:
            await self._idle.wait()
        finally:
            self.waiting -= 1


class TrackedTree(app_commands.CommandTree):
    """The command tree, counting each command in the bot's `WorkTracker` from its start
    until its reply or its error message is sent, so that a shutdown lets it finish
    instead of closing the connection under it."""

    async def _call(self, interaction: discord.Interaction[StoryBot]) -> None:
        async with self.client.work.tracked():  # type: ignore[attr-defined]
            try:
                await super()._call(interaction)
            except app_commands.AppCommandError as error:  # answered inside the count
                await self._dispatch_error(interaction, error)


class StoryBot(commands.Bot):
    def __init__(self, *, engine: StoryEngine, settings: BotSettings) -> None:
        # The bot never joins voice: no warning at every start about voice libraries.
        for flag in ("warn_nacl", "warn_dave"):
            if hasattr(discord.VoiceClient, flag):
                setattr(discord.VoiceClient, flag, False)
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents(),
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            activity=discord.CustomActivity(name=PRESENCE),
            tree_cls=TrackedTree,
            **shard_options(settings),
        )
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics()
        self.started_at = time.monotonic()
        self.gateway_connected = False
        """True from READY (or RESUMED) until the gateway connection drops."""
        self.health: HealthServer | None = None
        self.training = engine.training_scheduler(
            TrainingSchedule(
                settings.train_min_new_feedback,
                settings.train_interval_s,
                mode="external" if settings.train_mode == "external" else "local",
            )
        )
        self.work = WorkTracker()
        self.story_commands: StoryCog | None = None
        """The `/story` cog, which the story buttons act through (set in `setup_hook`)."""
        self._shutdown: asyncio.Task[None] | None = None
        self.tree.on_error = self.on_app_command_error  # type: ignore[method-assign]

    async def setup_hook(self) -> None:
        from .cogs.admin import AdminCog
        from .cogs.feedback import FeedbackCog
        from .cogs.story import StoryCog
        from .views import ChoiceButton, ContinueButton, RetryButton, SwipeButton

        await self.start_health_server()  # first: a supervisor sees "starting" meanwhile
        await self.start_engine()
        self.story_commands = StoryCog(self)
        await self.add_cog(self.story_commands)
        await self.add_cog(FeedbackCog(self))
        await self.add_cog(AdminCog(self))
        # Buttons on story messages keep working after a restart.
        self.add_dynamic_items(ContinueButton, RetryButton, SwipeButton, ChoiceButton)
        await self.sync_commands()
        self.turn_clock.change_interval(seconds=self.settings.turn_check_s)
        self.turn_clock.start()
        if self.settings.runs_training_clock:
            self.training_clock.change_interval(seconds=self.settings.train_check_s)
            self.training_clock.start()

    async def sync_commands(self) -> None:
        """Tell Discord the slash commands: the one process that should (the only one,
        or the one holding shard 0, unless BOT_SYNC_COMMANDS says otherwise)."""
        if not self.settings.syncs_commands:
            log.info("slash commands: synced by another process (BOT_SYNC_COMMANDS)")
            return
        if self.settings.dev_guild_id:
            guild = discord.Object(self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    def own_communities(self) -> set[str] | None:
        """The communities whose round-robin turns this process passes: None (every
        story's) unless sharded; sharded, the servers on its own shards, and in the
        process holding shard 0 direct messages (Discord sends them there) and the
        stories whose server is not known (`UNKNOWN_SERVER`: older than the record of
        communities), so that every game has exactly one process passing its turns."""
        if not self.settings.sharded:
            return None
        own = {str(g.id) for g in self.guilds if self.settings.owns_guild(g.id)}
        if 0 in self.settings.own_shards:
            own |= {DIRECT_MESSAGES, UNKNOWN_SERVER}
        return own

    async def start_health_server(self) -> None:
        if self.settings.health_port is None:
            return
        self.health = HealthServer(self, self.settings.health_host, self.settings.health_port)
        port = await self.health.start()
        host = self.settings.health_host
        shown = f"[{host}]" if ":" in host else host
        log.info("health: http://%s:%d/health and /metrics", shown, port)

    async def start_engine(self) -> None:
        """Load the model and open the database, saying what is used: one line each."""
        settings = self.engine.settings
        new_database = not settings.has_database
        log.info(
            "loading the storyteller: %s on %s%s",
            settings.base_model,
            settings.device,
            "" if settings.uses_bundled_model else " (downloaded on first use)",
        )
        started = time.perf_counter()
        await self.engine.start()
        model = self.engine.narrator.info
        log.info(
            "model %s on %s, loaded in %.1f s",
            model.model_id,
            model.describe(),
            time.perf_counter() - started,
        )
        promoted = (await self.engine.learning.serving(None)).shared
        if promoted is not None:
            log.info("adapter: %s (promoted), from %s", promoted.name, absolute(promoted.path))
        elif settings.adapter:
            log.info("adapter: %s (STORY_ADAPTER)", absolute(settings.adapter))
        else:
            log.info("adapter: none, the base model tells the stories")
        schema, stories = await self.engine.database_status()
        log.info(
            "database: %s (%s, schema %04d, %d stories)",
            settings.database_shown,
            "new" if new_database else "existing",
            schema,
            stories,
        )
        log.info(
            "adapters: %s; training round logs: %s",
            absolute(settings.adapter_dir),
            absolute(settings.round_log_dir),
        )

    async def on_ready(self) -> None:
        self.gateway_connected = True
        user = self.user
        log.info(
            "logged in as %s (%s), %d servers, %d shards",
            user.name if user else "?",
            user.id if user else "?",
            len(self.guilds),
            self.shard_count or 1,
        )

    async def on_resumed(self) -> None:
        self.gateway_connected = True
        log.info("gateway connection resumed")

    async def on_disconnect(self) -> None:
        if self.gateway_connected and not self.is_closed():  # not our own shutdown
            log.warning("gateway connection lost; reconnecting")
        self.gateway_connected = False

    async def on_interaction(self, interaction: discord.Interaction[StoryBot]) -> None:
        kind = interaction.type.name if interaction.type else "unknown"
        self.metrics.command(interaction_name(interaction.data, kind))  # type: ignore[arg-type]

    async def close(self) -> None:
        """Shut down in order, whoever asks (a signal, a test, discord.py itself), and
        only once: stop the training round and every generation, let their messages
        say so, then close the connection, then the engine (which records what was
        stopped and closes the database)."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._close_in_order())
        await asyncio.shield(self._shutdown)

    async def _close_in_order(self) -> None:
        self.turn_clock.cancel()
        self.training_clock.cancel()
        training = asyncio.ensure_future(self.training.close())
        stopped = self.engine.cancel_all()
        if stopped:
            log.info("stopping %d generation(s) in progress", stopped)
        try:
            await asyncio.wait_for(self.work.idle(), SHUTDOWN_GRACE_S)
        except TimeoutError:
            log.warning("%d repl(ies) still being written at shutdown", self.work.count)
        try:
            await training
        finally:
            try:
                await super().close()
            finally:
                self.gateway_connected = False
                try:
                    await self.engine.close(grace_s=2.0)
                finally:
                    if self.health is not None:
                        await self.health.stop()
        log.info("stopped")

    @tasks.loop(seconds=60)
    async def training_clock(self) -> None:
        """Start a training round when enough new feedback and time have come."""
        try:
            await self.training.maybe_start()
        except Exception:
            log.exception("checking the training schedule failed")

    @tasks.loop(seconds=15)
    async def turn_clock(self) -> None:
        """Pass round-robin turns whose time ran out, and say so in the channel."""
        from .render import describe_turn

        try:
            moved = await self.engine.expire_turns(self.own_communities())
        except Exception:
            log.exception("checking turn deadlines failed")
            return
        for channel_id, state in moved:
            log.info("round-robin: time up in channel %s, the turn passes", channel_id)
            channel = self.get_channel(int(channel_id))
            if channel is None:
                try:
                    channel = await self.fetch_channel(int(channel_id))
                except discord.HTTPException:
                    continue
            if isinstance(channel, discord.abc.Messageable):
                with contextlib.suppress(discord.HTTPException):
                    await channel.send(
                        safe("⏰ Time is up: the turn passes. " + describe_turn(state))
                    )

    @turn_clock.before_loop
    async def _before_turn_clock(self) -> None:
        await self.wait_until_ready()

    async def on_app_command_error(
        self, interaction: discord.Interaction[StoryBot], error: app_commands.AppCommandError
    ) -> None:
        await report_error(interaction, error)


class ShardedStoryBot(StoryBot, commands.AutoShardedBot):
    """The bot over one gateway connection per shard (BOT_SHARD_COUNT, BOT_SHARD_IDS):
    discord.py's `AutoShardedBot`, everything else as `StoryBot`."""


def shard_options(settings: BotSettings) -> dict[str, Any]:
    """What discord.py is told of the shards: nothing unless BOT_SHARD_COUNT is set."""
    if settings.shard_count is None:
        return {}
    return {"shard_count": settings.shard_count, "shard_ids": list(settings.own_shards)}


def make_bot(engine: StoryEngine, settings: BotSettings) -> StoryBot:
    """The bot the settings ask for: sharded (`AutoShardedBot`) or one connection."""
    kind = ShardedStoryBot if settings.sharded else StoryBot
    return kind(engine=engine, settings=settings)
