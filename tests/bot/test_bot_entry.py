"""`taleweaver-bot` as a user starts it: bad configuration ends it in one clear line."""

import os
import subprocess
import sys

import pytest

from bot.__main__ import read_token
from bot.settings import BotSettings
from storyengine.errors import ConfigError

GOOD = "MTAwMDAwMDAwMDAwMDAwMDAw.GabcDE.fake-token-for-tests-0123456789abcdef"


def run_bot(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "DEV_GUILD_ID")
    }
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "bot"],
        env=environment,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (
            None,
            "taleweaver-bot: error: DISCORD_TOKEN is not set (put it in .env or the environment)",
        ),
        (
            "not-a-token-secret123",
            "taleweaver-bot: error: DISCORD_TOKEN does not look like a bot token"
            " (three dot-separated parts)",
        ),
    ],
)
def test_missing_or_malformed_token_is_one_line_and_exit_2(tmp_path, token, message):
    result = run_bot({"DISCORD_TOKEN": token} if token else {}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert "Traceback" not in result.stderr
    if token:
        assert token not in result.stderr + result.stdout  # never printed


def test_bad_bot_setting_names_the_variable(tmp_path):
    result = run_bot({"DISCORD_TOKEN": GOOD, "DEV_GUILD_ID": "my-server"}, tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "taleweaver-bot: error: DEV_GUILD_ID: expected a server id (digits), got 'my-server'"
    )
    assert GOOD not in result.stderr


def test_token_and_settings_parsing():
    assert read_token({"DISCORD_TOKEN": f"  {GOOD} "}) == GOOD
    settings = BotSettings.from_env({"DEV_GUILD_ID": "123", "BOT_COOLDOWN": "2.5"})
    assert settings.dev_guild_id == 123 and settings.cooldown_s == 2.5
    with pytest.raises(ConfigError, match="BOT_COOLDOWN"):
        BotSettings.from_env({"BOT_COOLDOWN": "soon"})


def test_training_schedule_settings():
    default = BotSettings.from_env({})
    assert default.train_interval_s == 6 * 3600 and default.train_min_new_feedback == 50
    assert default.admin_guild_ids == frozenset()
    settings = BotSettings.from_env(
        {"TRAIN_INTERVAL": "30m", "TRAIN_MIN_NEW_FEEDBACK": "20", "BOT_ADMIN_GUILDS": "1, 22"}
    )
    assert settings.train_interval_s == 1800 and settings.train_min_new_feedback == 20
    assert settings.admin_guild_ids == {1, 22}
    assert BotSettings.from_env({"TRAIN_INTERVAL": "2d"}).train_interval_s == 2 * 86400
    assert BotSettings.from_env({"TRAIN_INTERVAL": "7200"}).train_interval_s == 7200
    assert BotSettings.from_env({"TRAIN_INTERVAL": "off"}).train_interval_s is None
    for bad in ("soon", "10s", "-1h"):
        with pytest.raises(ConfigError, match="TRAIN_INTERVAL"):
            BotSettings.from_env({"TRAIN_INTERVAL": bad})
    with pytest.raises(ConfigError, match="BOT_ADMIN_GUILDS"):
        BotSettings.from_env({"BOT_ADMIN_GUILDS": "my-server"})
    with pytest.raises(ConfigError, match="TRAIN_MIN_NEW_FEEDBACK"):
        BotSettings.from_env({"TRAIN_MIN_NEW_FEEDBACK": "0"})


def test_dotenv_is_read_from_the_working_directory(tmp_path):
    """README says: `.env` in the directory you start the bot from. An installed package
    lives elsewhere, so the file must be looked for from the working directory."""
    (tmp_path / ".env").write_text("DISCORD_TOKEN=not-a-token-secret123\n", encoding="utf-8")
    result = run_bot({}, tmp_path)
    assert result.returncode == 2
    assert "does not look like a bot token" in result.stderr  # it was read
    assert "not-a-token-secret123" not in result.stderr


def test_version_and_help_answer_without_a_token(tmp_path):
    """`--version` and `--help` are answered before any setting is read: no token error."""
    from storyengine.version import __version__

    assert __version__ not in ("", "unknown")  # the package is installed (pip -e)
    for args, expected in ((["--version"], f"taleweaver-bot {__version__}"), (["--help"], "")):
        result = subprocess.run(
            [sys.executable, "-m", "bot", *args],
            env={k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"},
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "DISCORD_TOKEN is not set" not in result.stderr
        if expected:
            assert result.stdout.strip() == expected
        else:
            assert result.stdout.startswith("usage: taleweaver-bot")
            assert "BOT_HEALTH_PORT" in result.stdout and "STORY_DATA_DIR" in result.stdout
