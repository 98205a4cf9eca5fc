"""A local fake of Discord for end-to-end tests: an aiohttp server on 127.0.0.1 that
speaks the gateway websocket (HELLO, IDENTIFY, READY, GUILD_CREATE, heartbeats,
zlib-stream transport compression, dispatched events) and the REST routes the bot uses.

Sharding as Discord does it: any number of gateway connections, each IDENTIFY naming
its `shard: [id, count]` (none: the one shard of one); each connection is sent only the
guilds of its shard (`(guild_id >> 22) % count == id`), and every event of a guild goes
over the connection of the shard that owns it (direct messages: shard 0's).
`FakeDiscord(guilds=(GUILD_ID, SECOND_GUILD_ID))` adds a second server, which falls on
shard 1 of 2 (the first on shard 0).

The real discord.py client connects to it (tests point `Route.BASE` and
`DiscordWebSocket.DEFAULT_GATEWAY` here). Every REST call is recorded, so tests assert
what a user would see; an unknown route is answered 404 and recorded in `unexpected`,
which the test fixture checks, so anything unplanned fails the test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

GUILD_ID = 1000
"""The server the tests play in: on shard 0 of 2 (`(1000 >> 22) % 2 == 0`)."""
SECOND_GUILD_ID = (1 << 22) + 1000
"""A second server, only where a test asks for it: on shard 1 of 2."""
TEXT_CHANNEL = 2000
OTHER_CHANNEL = 2001
SECOND_CHANNEL = 2002
"""The second server's text channel."""
GUILD_NAMES = {GUILD_ID: "Story Club", SECOND_GUILD_ID: "Tale Tellers"}
BOT_ID = 900
MANAGE_MESSAGES = 1 << 13
MANAGE_GUILD = 1 << 5
EVERYONE_PERMISSIONS = (
    (1 << 10) | (1 << 11) | (1 << 6) | (1 << 14) | (1 << 15) | (1 << 31) | (1 << 35) | (1 << 38)
)


def user_json(user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "global_name": name,
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


@dataclass
class FakeUser:
    id: int
    name: str
    moderator: bool = False
    admin: bool = False

    def member(self) -> dict[str, Any]:
        permissions = EVERYONE_PERMISSIONS | (MANAGE_MESSAGES if self.moderator else 0)
        permissions |= MANAGE_GUILD if self.admin else 0
        return {
            "user": user_json(self.id, self.name),
            "roles": [],
            "joined_at": "2026-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str(permissions),
            "nick": None,
        }


@dataclass
class Upload:
    """A file a user attaches to a slash command option (`fake.slash(..., file=Upload(...))`)."""

    filename: str
    data: bytes


def shard_of(guild_id: int, shard_count: int) -> int:
    """The shard a guild's events go to (Discord's rule)."""
    return (guild_id >> 22) % shard_count


@dataclass
class Connection:
    """One gateway websocket: a shard, once it has identified."""

    ws: web.WebSocketResponse
    compressor: Any
    seq: int = 0
    shard: tuple[int, int] | None = None
    """(id, count) from IDENTIFY (or RESUME); None before."""


@dataclass
class Call:
    method: str
    path: str
    body: Any
    at: float


@dataclass
class InteractionRecord:
    id: int
    token: str
    user: FakeUser
    channel_id: int
    dispatched_at: float
    acked_at: float | None = None
    callback_type: int | None = None
    ephemeral: bool = False
    original_id: int | None = None
    """The reply: the message the callback created (or, for type 7, updated)."""
    source_id: int | None = None
    """For a button press: the message the button is on."""
    followups: list[int] = field(default_factory=list)

    @property
    def ack_seconds(self) -> float | None:
        return None if self.acked_at is None else self.acked_at - self.dispatched_at


class FakeDiscord:
    def __init__(self, *, guilds: tuple[int, ...] = (GUILD_ID,), gateway_shards: int = 1) -> None:
        self.guilds = guilds
        """The servers the bot is in (`GUILD_NAMES` names them)."""
        self.gateway_shards = gateway_shards
        """How many shards `GET /gateway/bot` recommends."""
        self.calls: list[Call] = []
        self.unexpected: list[str] = []
        self.uploads: dict[str, bytes] = {}
        """Files users attached to commands, by attachment id (served as the CDN does)."""
        self.messages: dict[int, dict[str, Any]] = {}
        self.reactions: list[tuple[int, str]] = []  # (message id, emoji) added by the bot
        self.interactions: dict[int, InteractionRecord] = {}
        self.by_token: dict[str, InteractionRecord] = {}
        self.channels: dict[int, dict[str, Any]] = {
            TEXT_CHANNEL: self._text_channel(TEXT_CHANNEL, "story-time"),
            OTHER_CHANNEL: self._text_channel(OTHER_CHANNEL, "other"),
        }
        if SECOND_GUILD_ID in guilds:
            self.channels[SECOND_CHANNEL] = self._text_channel(
                SECOND_CHANNEL, "tales", guild_id=SECOND_GUILD_ID
            )
        self.commands: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        """Set when the bot has synced its commands."""
        self.connected = asyncio.Event()
        """Set when the bot has identified on the gateway and been sent its guild."""
        self.identified = 0
        self.identify_payloads: list[dict[str, Any]] = []
        """What the bot sent with each IDENTIFY (its presence, intents; token removed)."""
        self.identified_shards: list[tuple[int, int]] = []
        """The (shard id, shard count) of each IDENTIFY, in order ((0, 1) when unsharded)."""
        self.refuse_gateway = False
        """While True, new gateway connections are refused (Discord unreachable)."""
        self.resumed = 0
        self.connections: list[Connection] = []
        """The open gateway connections."""
        self._shards: dict[int, Connection] = {}
        """Each identified shard's connection, by shard id."""
        self._sessions: dict[str, tuple[int, int]] = {}
        """Each session READY gave, with its shard (RESUME names only the session)."""
        self._ids = itertools.count(10**17)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- server ---------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/gateway", self._gateway)
        r = app.router
        r.add_get("/api/v10/gateway/bot", self._gateway_bot)
        r.add_get("/api/v10/users/@me", self._me)
        r.add_get("/api/v10/oauth2/applications/@me", self._application)
        r.add_put("/api/v10/applications/{app}/commands", self._sync)
        r.add_put("/api/v10/applications/{app}/guilds/{guild}/commands", self._sync)
        r.add_post("/api/v10/interactions/{id}/{token}/callback", self._callback)
        r.add_get("/api/v10/webhooks/{app}/{token}/messages/@original", self._get_original)
        r.add_patch("/api/v10/webhooks/{app}/{token}/messages/@original", self._edit_original)
        r.add_delete("/api/v10/webhooks/{app}/{token}/messages/@original", self._delete_original)
        r.add_post("/api/v10/webhooks/{app}/{token}", self._followup)
        r.add_post("/api/v10/channels/{channel}/messages", self._channel_message)
        r.add_patch("/api/v10/channels/{channel}/messages/{message}", self._edit_message)
        r.add_put(
            "/api/v10/channels/{channel}/messages/{message}/reactions/{emoji}/@me", self._react
        )
        r.add_post("/api/v10/channels/{channel}/threads", self._thread)
        r.add_get("/api/v10/channels/{channel}", self._get_channel)
        r.add_post("/api/v10/users/@me/channels", self._dm)
        r.add_get("/attachments/{id}/{filename}", self._attachment)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for connection in list(self.connections):
            await connection.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[..., Any]
    ) -> web.StreamResponse:
        if request.path != "/gateway":
            body: Any = None
            if request.content_type == "application/json":
                raw = await request.read()
                body = json.loads(raw) if raw else None
            self.calls.append(Call(request.method, request.path, body, time.monotonic()))
            if (
                request.headers.get("Authorization") != "Bot " + TOKEN
                and "/webhooks/" not in request.path
                and "/interactions/" not in request.path
                and not request.path.startswith("/attachments/")  # the CDN: no token
            ):
                self.unexpected.append(f"no bot token on {request.method} {request.path}")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            self.unexpected.append(f"{request.method} {request.path}")
            return _json({"message": "404: Not Found", "code": 0}, status=404)

    # -- gateway --------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_gateway:
            return web.Response(status=503, text="gateway unavailable")
        if request.query.get("compress") not in (None, "zlib-stream"):
            self.unexpected.append(f"gateway compression {request.query.get('compress')}")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        connection = Connection(ws, zlib.compressobj() if request.query.get("compress") else None)
        self.connections.append(connection)
        try:
            await self._send(
                connection, {"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None}
            )
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                if payload["op"] == 1:
                    await self._send(connection, {"op": 11, "d": None, "s": None, "t": None})
                elif payload["op"] == 2:
                    await self._identify(connection, payload["d"])
                elif payload["op"] == 6:  # RESUME after a dropped connection
                    await self._resume(connection, payload["d"])
                elif payload["op"] not in (3,):
                    self.unexpected.append(f"gateway op {payload['op']}")
        finally:
            self.connections.remove(connection)
            if connection.shard is not None and self._shards.get(connection.shard[0]) is connection:
                del self._shards[connection.shard[0]]
        return ws

    async def _identify(self, connection: Connection, data: dict[str, Any]) -> None:
        self.identified += 1
        if data.get("token") != TOKEN:
            self.unexpected.append("IDENTIFY with the wrong token")
        self.identify_payloads.append({k: v for k, v in data.items() if k != "token"})
        shard = data.get("shard", [0, 1])
        if (
            not isinstance(shard, list)
            or len(shard) != 2
            or not all(isinstance(n, int) for n in shard)
            or not 0 <= shard[0] < shard[1]
        ):
            self.unexpected.append(f"IDENTIFY with shard {shard!r}")
            await connection.ws.close(code=4010)  # Discord: invalid shard
            return
        shard_id, count = shard
        counts = {c.shard[1] for c in self._shards.values() if c.shard is not None}
        if counts - {count}:
            self.unexpected.append(f"IDENTIFY as shard {shard} while others count {counts}")
        if shard_id in self._shards and not self._shards[shard_id].ws.closed:
            self.unexpected.append(f"IDENTIFY as shard {shard}, which is already connected")
        connection.shard = (shard_id, count)
        self._shards[shard_id] = connection
        self.identified_shards.append((shard_id, count))
        await self._dispatch_to(connection, "READY", self._ready(shard_id, count))
        for guild_id in self.guilds_of(shard_id, count):
            await self._dispatch_to(connection, "GUILD_CREATE", self._guild(guild_id))
        self.connected.set()

    async def _resume(self, connection: Connection, data: dict[str, Any]) -> None:
        if data.get("token") != TOKEN:
            self.unexpected.append("RESUME with the wrong token")
        session = str(data.get("session_id", ""))
        shard = self._sessions.get(session)
        if shard is None:
            self.unexpected.append(f"RESUME of an unknown session {session!r}")
            return
        connection.shard = shard
        self._shards[shard[0]] = connection
        self.resumed += 1
        await self._dispatch_to(connection, "RESUMED", {})
        self.connected.set()

    def guilds_of(self, shard_id: int, shard_count: int) -> list[int]:
        """The guilds a shard's connection carries."""
        return [g for g in self.guilds if shard_of(g, shard_count) == shard_id]

    @property
    def shards_connected(self) -> set[int]:
        """The ids of the shards with a connection now."""
        return set(self._shards)

    async def drop_gateway(self, code: int = 4000, *, shard: int | None = None) -> None:
        """Close the bot's gateway connection (only `shard`'s, if given) as Discord does
        when something went wrong on its side (4000: reconnect and resume)."""
        self.connected.clear()
        for connection in list(self.connections):
            if shard is None or (connection.shard is not None and connection.shard[0] == shard):
                await connection.ws.close(code=code)

    async def _send(self, connection: Connection, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        if connection.compressor is None:
            await connection.ws.send_str(data.decode())
        else:
            await connection.ws.send_bytes(
                connection.compressor.compress(data)
                + connection.compressor.flush(zlib.Z_SYNC_FLUSH)
            )

    async def _dispatch_to(self, connection: Connection, event: str, data: dict[str, Any]) -> None:
        connection.seq += 1
        await self._send(connection, {"op": 0, "t": event, "s": connection.seq, "d": data})

    async def dispatch(
        self, event: str, data: dict[str, Any], *, guild_id: int | None = None
    ) -> None:
        """Send an event over the connection of the shard that owns `guild_id` (no
        guild: shard 0's, as Discord sends direct messages)."""
        if not self._shards:
            raise AssertionError(f"{event}: the bot has no gateway connection")
        count = next(iter(self._shards.values())).shard[1]  # type: ignore[index]
        shard = 0 if guild_id is None else shard_of(guild_id, count)
        connection = self._shards.get(shard)
        if connection is None:
            raise AssertionError(f"{event} for guild {guild_id}: shard {shard} is not connected")
        await self._dispatch_to(connection, event, data)

    def _ready(self, shard_id: int, shard_count: int) -> dict[str, Any]:
        session = "fake-session" if shard_count == 1 else f"fake-session-{shard_id}"
        self._sessions[session] = (shard_id, shard_count)
        return {
            "v": 10,
            "user": user_json(BOT_ID, "Taleweaver", bot=True),
            "guilds": [
                {"id": str(g), "unavailable": True} for g in self.guilds_of(shard_id, shard_count)
            ],
            "session_id": session,
            "resume_gateway_url": self.gateway_url,
            "shard": [shard_id, shard_count],
            "application": {"id": str(BOT_ID), "flags": 0},
            "private_channels": [],
            "relationships": [],
        }

    def _guild(self, guild_id: int = GUILD_ID) -> dict[str, Any]:
        return {
            "id": str(guild_id),
            "name": GUILD_NAMES[guild_id],
            "icon": None,
            "owner_id": "101",
            "unavailable": False,
            "member_count": 5,
            "large": False,
            "features": [],
            "joined_at": "2026-01-01T00:00:00+00:00",
            "emojis": [],
            "stickers": [],
            "roles": [
                {
                    "id": str(guild_id),
                    "name": "@everyone",
                    "permissions": str(EVERYONE_PERMISSIONS),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                }
            ],
            "members": [
                {
                    **FakeUser(BOT_ID, "Taleweaver").member(),
                    "user": user_json(BOT_ID, "Taleweaver", bot=True),
                }
            ],
            "channels": [
                c
                for c in self.channels.values()
                if c["type"] == 0 and c["guild_id"] == str(guild_id)
            ],
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "premium_tier": 0,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "system_channel_flags": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
        }

    def _text_channel(
        self, channel_id: int, name: str, *, guild_id: int = GUILD_ID
    ) -> dict[str, Any]:
        return {
            "id": str(channel_id),
            "type": 0,
            "name": name,
            "guild_id": str(guild_id),
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        }

    # -- REST -----------------------------------------------------------------------

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": self.gateway_shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 86_400_000,
                    "max_concurrency": 1,
                },
            }
        )

    async def _me(self, request: web.Request) -> web.Response:
        return _json(user_json(BOT_ID, "Taleweaver", bot=True))

    async def _application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": str(BOT_ID),
                "name": "Taleweaver",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": user_json(101, "Ann"),
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
                "summary": "",
                "rpc_origins": [],
            }
        )

    async def _sync(self, request: web.Request) -> web.Response:
        commands = await request.json()
        # Discord's limits: 25 options (subcommands, groups, parameters) at every level.
        crowded = [
            c["name"] for c in _nested(commands) if len(c.get("options") or []) > MAX_OPTIONS
        ]
        if crowded:
            self.unexpected.append(f"more than {MAX_OPTIONS} options in {crowded}")
            return _json({"message": "Invalid Form Body", "code": 50035}, status=400)
        self.commands = [
            {**c, "id": str(next(self._ids)), "application_id": str(BOT_ID), "version": "1"}
            for c in commands
        ]
        self.ready.set()
        return _json(self.commands)

    async def _callback(self, request: web.Request) -> web.Response:
        record = self.interactions[int(request.match_info["id"])]
        if record.acked_at is not None:
            return _json(
                {"message": "Interaction has already been acknowledged.", "code": 40060}, status=400
            )
        payload, files = await _payload(request)
        record.callback_type = payload["type"]
        record.acked_at = time.monotonic()
        data = payload.get("data") or {}
        interaction = {"id": str(record.id), "type": 2}
        resource: dict[str, Any] = {"type": payload["type"]}
        if payload["type"] in (4, 5):  # a message (or a "thinking…" placeholder)
            record.ephemeral = bool((data.get("flags") or 0) & 64)
            message = self._new_message(
                record.channel_id, data, files, flags=128 if payload["type"] == 5 else 0
            )
            record.original_id = int(message["id"])
            interaction.update(
                response_message_id=message["id"],
                response_message_loading=payload["type"] == 5,
                response_message_ephemeral=record.ephemeral,
            )
            resource["message"] = message
        elif payload["type"] == 6:  # a button press acknowledged, the message edited later
            assert record.source_id is not None
            record.original_id = record.source_id
        elif payload["type"] == 7:  # update the message the button is on
            assert record.source_id is not None
            message = self.messages[record.source_id]
            record.original_id = record.source_id
            self._apply_edit(message, data, files)
            resource["message"] = message
        return _json({"interaction": interaction, "resource": resource})

    async def _get_original(self, request: web.Request) -> web.Response:
        return _json(self.messages[self._original(request)])

    async def _edit_original(self, request: web.Request) -> web.Response:
        payload, files = await _payload(request)
        message = self.messages[self._original(request)]
        self._apply_edit(message, payload, files)
        return _json(message)

    async def _delete_original(self, request: web.Request) -> web.Response:
        self.messages.pop(self._original(request))["deleted"] = True
        return web.Response(status=204)

    def _original(self, request: web.Request) -> int:
        record = self.by_token[request.match_info["token"]]
        if record.original_id is None:
            raise web.HTTPNotFound()
        return record.original_id

    async def _followup(self, request: web.Request) -> web.Response:
        record = self.by_token[request.match_info["token"]]
        payload, files = await _payload(request)
        message = self._new_message(record.channel_id, payload, files)
        record.followups.append(int(message["id"]))
        return _json(message)

    async def _channel_message(self, request: web.Request) -> web.Response:
        payload, files = await _payload(request)
        return _json(self._new_message(int(request.match_info["channel"]), payload, files))

    async def _edit_message(self, request: web.Request) -> web.Response:
        payload, files = await _payload(request)
        message = self.messages[int(request.match_info["message"])]
        self._apply_edit(message, payload, files)
        return _json(message)

    async def _react(self, request: web.Request) -> web.Response:
        message_id = int(request.match_info["message"])
        if message_id not in self.messages:
            raise web.HTTPNotFound()
        self.reactions.append((message_id, urllib.parse.unquote(request.match_info["emoji"])))
        return web.Response(status=204)

    async def _thread(self, request: web.Request) -> web.Response:
        payload = await request.json()
        thread_id = next(self._ids)
        guild_id = int(self.channels[int(request.match_info["channel"])]["guild_id"])
        thread = {
            "id": str(thread_id),
            "type": payload.get("type", 11),
            "name": payload["name"],
            "guild_id": str(guild_id),
            "parent_id": request.match_info["channel"],
            "owner_id": str(BOT_ID),
            "member_count": 1,
            "message_count": 0,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": payload.get("auto_archive_duration", 1440),
                "archive_timestamp": "2026-01-01T00:00:00+00:00",
                "locked": False,
            },
        }
        self.channels[thread_id] = thread
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True}, guild_id=guild_id)
        return _json(thread)

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel = self.channels.get(int(request.match_info["channel"]))
        if channel is None:
            raise web.HTTPNotFound()
        return _json(channel)

    async def _dm(self, request: web.Request) -> web.Response:
        recipient = (await request.json())["recipient_id"]
        channel_id = next(self._ids)
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": 1,
            "recipients": [user_json(int(recipient), "user")],
        }
        return _json(self.channels[channel_id])

    # -- messages -------------------------------------------------------------------

    def _new_message(
        self, channel_id: int, data: dict[str, Any], files: list[dict[str, Any]], *, flags: int = 0
    ) -> dict[str, Any]:
        message_id = next(self._ids)
        channel = self.channels.get(channel_id, {})
        message = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": user_json(BOT_ID, "Taleweaver", bot=True),
            "content": data.get("content") or "",
            "timestamp": "2026-01-01T00:00:00+00:00",
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "embeds": [],
            "attachments": files,
            "pinned": False,
            "type": 0,
            "flags": flags | (data.get("flags") or 0),
            "components": data.get("components") or [],
            "allowed_mentions": data.get("allowed_mentions"),
        }
        if "guild_id" in channel:
            message["guild_id"] = channel["guild_id"]
        self.messages[message_id] = message
        return message

    @staticmethod
    def _apply_edit(
        message: dict[str, Any], data: dict[str, Any], files: list[dict[str, Any]]
    ) -> None:
        for key in ("content", "components", "allowed_mentions"):
            if key in data:
                message[key] = (
                    data[key] if data[key] is not None else ([] if key == "components" else "")
                )
        if files:
            message["attachments"] = files
        message["flags"] = message.get("flags", 0) & ~128  # no longer "thinking"
        message["edited_timestamp"] = "2026-01-01T00:00:01+00:00"

    async def _attachment(self, request: web.Request) -> web.Response:
        data = self.uploads.get(request.match_info["id"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/octet-stream")

    # -- what the tests do ------------------------------------------------------------

    def dm_channel(self, user: FakeUser) -> int:
        """A direct-message channel between `user` and the bot."""
        channel_id = next(self._ids)
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": 1,
            "recipients": [user_json(user.id, user.name)],
        }
        return channel_id

    def command_id(self, group: str = "story") -> str:
        return next(c["id"] for c in self.commands if c["name"] == group)

    async def slash(
        self, user: FakeUser, channel_id: int, sub: str, *, group: str = "story", **options: Any
    ) -> InteractionRecord:
        """`/GROUP SUB option:value ...` typed by `user` in `channel_id` (`sub` may be
        `"lore add"`: a subcommand group and its subcommand)."""
        kinds = {str: 3, int: 4, float: 10, bool: 5}
        resolved: dict[str, Any] = {}
        uploaded: set[str] = set()
        for name, value in list(options.items()):
            if isinstance(value, Upload):  # Discord uploads it first, then refers to it
                attachment_id = str(next(self._ids))
                self.uploads[attachment_id] = value.data
                url = f"http://127.0.0.1:{self.port}/attachments/{attachment_id}/{value.filename}"
                resolved[attachment_id] = {
                    "id": attachment_id,
                    "filename": value.filename,
                    "size": len(value.data),
                    "url": url,
                    "proxy_url": url,
                    "content_type": "application/json",
                }
                options[name] = attachment_id
                uploaded.add(name)
        command: dict[str, Any] = {
            "type": 1,
            "name": sub.split()[-1],
            "options": [
                {"type": 11 if k in uploaded else kinds[type(v)], "name": k, "value": v}
                for k, v in options.items()
            ],
        }
        if " " in sub:  # `lore add`: a subcommand of a subcommand group
            command = {"type": 2, "name": sub.split()[0], "options": [command]}
        data = {"id": self.command_id(group), "name": group, "type": 1, "options": [command]}
        if resolved:
            data["resolved"] = {"attachments": resolved}
        return await self._interact(user, channel_id, 2, data)

    async def press(self, user: FakeUser, message_id: int, custom_id: str) -> InteractionRecord:
        """`user` presses the button `custom_id` on a message (one it shows: Discord
        offers no other)."""
        message = self.messages[message_id]
        rows = message.get("components") or []
        shown = [c.get("custom_id") for row in rows for c in row["components"]]
        assert custom_id in shown, f"message {message_id} has no button {custom_id!r}: {shown}"
        return await self._interact(
            user,
            int(message["channel_id"]),
            3,
            {"custom_id": custom_id, "component_type": 2},
            message=message,
        )

    async def _interact(
        self,
        user: FakeUser,
        channel_id: int,
        kind: int,
        data: dict[str, Any],
        *,
        message: dict[str, Any] | None = None,
    ) -> InteractionRecord:
        interaction_id = next(self._ids)
        token = f"token-{interaction_id}"
        record = InteractionRecord(interaction_id, token, user, channel_id, time.monotonic())
        self.interactions[interaction_id] = record
        self.by_token[token] = record
        channel = self.channels[channel_id]
        guild_id = int(channel["guild_id"]) if "guild_id" in channel else None
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(BOT_ID),
            "type": kind,
            "data": data,
            "channel_id": str(channel_id),
            "channel": channel,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "app_permissions": str(EVERYONE_PERMISSIONS),
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or GUILD_ID)},
            "context": 0,
            "attachment_size_limit": 8 * 1024 * 1024,
        }
        if guild_id is not None:
            payload.update(guild_id=str(guild_id), guild_locale="en-US", member=user.member())
        else:
            payload["user"] = user_json(user.id, user.name)
        if message is not None:
            payload["message"] = message
            record.source_id = int(message["id"])
        await self.dispatch("INTERACTION_CREATE", payload, guild_id=guild_id)
        return record

    async def react(
        self, user: FakeUser, message_id: int, emoji: str, *, add: bool = True, bot: bool = False
    ) -> None:
        message = self.messages.get(message_id)
        channel_id = int(message["channel_id"]) if message else TEXT_CHANNEL
        guild_id = int(self.channels.get(channel_id, {}).get("guild_id", GUILD_ID))
        data: dict[str, Any] = {
            "user_id": str(user.id),
            "channel_id": str(channel_id),
            "message_id": str(message_id),
            "guild_id": str(guild_id),
            "emoji": {"id": None, "name": emoji},
            "type": 0,
            "burst": False,
        }
        if add:
            member = user.member()
            member["user"]["bot"] = bot
            data.update(member=member, message_author_id=str(BOT_ID), burst_colors=[])
        await self.dispatch(
            "MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", data, guild_id=guild_id
        )

    async def wait_for(self, condition: Callable[[], Any], seconds: float = 60.0) -> Any:
        try:
            async with asyncio.timeout(seconds):
                while not (result := condition()):  # noqa: ASYNC110 - polling what the bot did
                    await asyncio.sleep(0.02)
                return result
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {condition}") from None

    def bot_messages(self, channel_id: int) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if int(m["channel_id"]) == channel_id]

    def reactions_on(self, message_id: int) -> list[str]:
        return [e for m, e in self.reactions if m == message_id]


TOKEN = "MTAwMDAwMDAwMDAwMDAwMDAw.GabcDE.fake-token-for-tests-0123456789abcdef"


MAX_OPTIONS = 25


def _nested(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every command, subcommand group and subcommand in a sync payload."""
    out = []
    for command in commands:
        out.append(command)
        out += _nested([o for o in command.get("options") or [] if o.get("type") in (1, 2)])
    return out


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py checks the content type exactly: no charset suffix. An attachment's
    # bytes (kept for the tests) are not part of what Discord sends back.
    body = json.dumps(data, default=lambda o: None if isinstance(o, bytes) else str(o))
    return web.Response(
        body=body.encode(), status=status, headers={"Content-Type": "application/json"}
    )


async def _payload(request: web.Request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The JSON payload of a request, and its files when it is multipart."""
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        payload = json.loads(form["payload_json"])  # type: ignore[arg-type]
        files = []
        for key, value in form.items():
            if key.startswith("files["):
                data = value.file.read()  # type: ignore[union-attr]
                try:
                    text: str | None = data.decode("utf-8")
                except UnicodeDecodeError:  # an image: `data` has the bytes
                    text = None
                files.append(
                    {
                        "id": str(len(files)),
                        "filename": value.filename,  # type: ignore[union-attr]
                        "content": text,
                        "data": data,
                        "size": len(data),
                        "url": "",
                        "proxy_url": "",
                    }
                )
        return payload, files
    body = await request.read()  # cached: the recording middleware may have read it
    return (json.loads(body), []) if body else ({}, [])
