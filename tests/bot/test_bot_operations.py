"""Running the bot for real, end to end against the fake Discord: the health endpoint
and the metrics a supervisor reads, the presence, the stats chart, and the live
progress of `/storyadmin train`."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import aiohttp
import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.cogs.admin import CHART_NAME
from storyengine.learning.stats import png_size
from tests.bot.test_bot_e2e import ADMIN, ANN, BEN, Harness, finished
from tests.helpers.fake_discord import TEXT_CHANNEL, TOKEN, FakeDiscord

pytestmark = pytest.mark.slow


@pytest.fixture
async def ops(tmp_path, bundled_model, monkeypatch):
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    harness = Harness(fake, tmp_path / "bot.db", bundled_model)
    await harness.start(health_port=0)  # any free port
    async with aiohttp.ClientSession() as http:
        harness.http = http
        yield harness
    await harness.stop()
    await fake.stop()
    assert fake.unexpected == []


async def get(harness, path: str) -> tuple[int, str]:
    port = harness.env.bot.health.port
    async with harness.http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})?'
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))$"
)

LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus' text format (0.0.4), strictly: every sample belongs to a family
    declared by HELP and TYPE lines before it; counters end in _total; values are
    numbers. Returns {(name, labels): value}."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            assert name in helped and name not in types, line
            assert kind != "counter" or name.endswith("_total"), line
            types[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        assert match["name"] in types, f"sample before its TYPE: {line!r}"
        labels = tuple(
            re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match["labels"] or "")
        )
        key = (match["name"], labels)
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(match["value"])
    return samples


def total(samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_health_and_metrics_of_a_running_bot(ops):
    fake = ops.fake
    status, body = await get(ops, "/health")
    state = json.loads(body)
    assert status == 200, state
    assert state["status"] == "ok" and state["gateway"]["connected"]
    assert state["database"]["reachable"] and state["generator"]["alive"]
    assert state["gateway"]["heartbeat_age_s"] is not None
    # The bot shows how to begin in the member list (sent with IDENTIFY).
    presence = json.dumps(fake.identify_payloads[0]["presence"])
    assert "/story start to begin" in presence

    status, text = await get(ops, "/metrics")
    assert status == 200
    before = parse_prometheus(text)
    assert before[("taleweaver_up", ())] == 1
    assert before[("taleweaver_gateway_connected", ())] == 1
    assert total(before, "taleweaver_generations_total") == 0

    # A story is told and reacted to: the counters move.
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    message = await finished(fake, start)
    await fake.react(BEN, int(message["id"]), "👍")
    await fake.wait_for(lambda: ops.env.engine.reactions.recorded == 1)

    async def metrics():
        return parse_prometheus((await get(ops, "/metrics"))[1])

    after = await metrics()
    assert after[("taleweaver_reactions_recorded_total", ())] == 1
    generations = {k[1]: v for k, v in after.items() if k[0] == "taleweaver_generations_total"}
    assert sum(generations.values()) >= 1  # the opening (and any retry of an empty one)
    assert set(generations) <= {(("outcome", "eos"),), (("outcome", "length"),)}
    assert after[("taleweaver_commands_total", (("command", "story start"),))] == 1
    assert after[("taleweaver_commands_per_minute", ())] >= 1
    assert after[("taleweaver_generation_queue_depth", ())] == 0
    assert after[("taleweaver_training_running", ())] == 0
    for body in (text, json.dumps(state)):  # nothing secret
        assert TOKEN not in body and str(ops.db) not in body

    # The gateway drops and Discord cannot be reached: unhealthy.
    fake.refuse_gateway = True
    await fake.drop_gateway()
    await fake.wait_for(lambda: not ops.env.bot.gateway_connected, 30)
    status, body = await get(ops, "/health")
    assert status == 503
    assert json.loads(body)["gateway"]["connected"] is False
    assert (await metrics())[("taleweaver_up", ())] == 0

    # Discord is back: the bot resumes and is healthy again.
    fake.refuse_gateway = False
    await fake.wait_for(lambda: ops.env.bot.gateway_connected, 60)
    status, _ = await get(ops, "/health")
    assert status == 200 and fake.resumed >= 1


async def test_stats_attaches_a_chart_and_keeps_the_text(ops):
    fake = ops.fake
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, an owl.")
    message = await finished(fake, start)
    await fake.react(ANN, int(message["id"]), "👍")
    await fake.react(BEN, int(message["id"]), "👎")
    await fake.wait_for(lambda: ops.env.engine.reactions.recorded == 2)

    stats = await fake.slash(ADMIN, TEXT_CHANNEL, "stats", group="storyadmin")
    await fake.wait_for(
        lambda: stats.original_id and fake.messages[stats.original_id]["attachments"]
    )
    reply = fake.messages[stats.original_id]
    assert stats.ephemeral
    attachment = reply["attachments"][0]
    assert attachment["filename"] == CHART_NAME
    assert attachment["data"].startswith(b"\x89PNG\r\n\x1a\n")
    assert png_size(attachment["data"]) == (1000, 700)
    assert attachment["size"] == len(attachment["data"]) > 10_000
    # The figures in words, for screen readers: approval and the votes behind it.
    assert "base model: approval 50% (1 liked, 1 disliked)" in reply["content"]
    assert "Reactions: 2 in the last 7 days" in reply["content"]


ROUND = textwrap.dedent(
    """
    import pathlib, sys, time
    from storyengine.progress import Progress
    go = pathlib.Path(sys.argv[1])
    print("training kto on 12 examples (lr 0.0001, 1 epochs)", flush=True)
    progress = Progress("training", 6, say=lambda line: print(line, flush=True), json_every_s=0)
    for step in (1, 2, 3):
        progress.update(step, detail="loss 0.69")
    while not go.exists():  # the test looks at the reply mid-round, then lets it finish
        time.sleep(0.02)
    for step in (4, 5, 6):
        progress.update(step, detail="loss 0.61")
    progress.close()
    print("promoted v1", flush=True)
    """
)


async def test_train_shows_a_live_progress_bar_then_the_outcome(ops, tmp_path):
    fake, bot = ops.fake, ops.env.bot
    go = tmp_path / "go"
    bot.training.command = [sys.executable, "-c", ROUND, str(go)]
    train = await fake.slash(ADMIN, TEXT_CHANNEL, "train", group="storyadmin")

    def reply() -> str:
        return fake.messages[train.original_id]["content"] if train.original_id else ""

    await fake.wait_for(lambda: "step 3/6" in reply())
    assert reply() == (
        "🏋️ Training round running: " + bot.training.job.last_line + "\n"
        "`██████████░░░░░░░░░░` training: " + bot.training.job.progress.describe()
    )
    assert "(50%) · loss 0.69" in reply() and "left" in reply()
    go.touch()
    await fake.wait_for(lambda: reply().startswith("Training round finished: promoted v1"))
    assert "`████████████████████` training: step 6/6 (100%) · loss 0.61" in reply()
