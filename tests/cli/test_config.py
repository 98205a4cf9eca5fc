import subprocess
import sys

import pytest

from storyengine.config import BUNDLED_MODEL, Settings, bundled_model_path
from storyengine.errors import ConfigError


def test_defaults_use_the_bundled_model():
    settings = Settings.from_env({})
    assert settings.base_model == BUNDLED_MODEL
    assert settings.model_path == str(bundled_model_path())
    assert (bundled_model_path() / "model.safetensors").is_file()
    assert settings.preset == "balanced"


def test_environment_overrides_the_preset():
    settings = Settings.from_env(
        {
            "STORY_PRESET": "gentle",
            "STORY_TEMPERATURE": "0.3",
            "STORY_MAX_NEW_TOKENS": "40",
            "STORY_BLOCKLIST": "Grim, dark ",
            "STORY_DB_PATH": "/tmp/x.db",
        }
    )
    assert settings.sampling.temperature == 0.3
    assert settings.sampling.max_new_tokens == 40
    assert settings.sampling.top_p == 0.9  # from the gentle preset
    assert settings.blocklist == ("grim", "dark")
    assert str(settings.db_path) == "/tmp/x.db"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"STORY_TEMPERATURE": "hot"}, "STORY_TEMPERATURE"),
        ({"STORY_TEMPERATURE": "9"}, "STORY_TEMPERATURE"),
        ({"STORY_TOP_K": "1.5"}, "STORY_TOP_K"),
        ({"STORY_MAX_NEW_TOKENS": "0"}, "STORY_MAX_NEW_TOKENS"),
        ({"STORY_PRESET": "spicy"}, "STORY_PRESET"),
        ({"STORY_DEVICE": "tpu"}, "STORY_DEVICE"),
        ({"STORY_DTYPE": "int3"}, "STORY_DTYPE"),
        ({"STORY_ADAPTER": "/no/such/adapter"}, "STORY_ADAPTER"),
        ({"STORY_MAX_INPUT_CHARS": "5"}, "STORY_MAX_INPUT_CHARS"),
        ({"STORY_LOG_LEVEL": "LOUD"}, "STORY_LOG_LEVEL"),
    ],
)
def test_bad_setting_names_the_variable(env, variable):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert message.startswith(variable + ":")
    assert "\n" not in message


def test_cli_reports_a_bad_setting_in_one_line(tmp_path):
    env = {"STORY_TEMPERATURE": "warm", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "storyengine", "db", "status", "--db", str(tmp_path / "x.db")],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "storyengine: error: STORY_TEMPERATURE: expected a number, got 'warm'"
    ]
    assert "Traceback" not in result.stderr


def test_env_example_lists_valid_settings():
    """`.env.example` parses as it stands, and names every setting the code reads."""
    from pathlib import Path

    from dotenv import dotenv_values

    from bot.settings import BotSettings

    root = Path(__file__).resolve().parents[2]
    values = {k: v for k, v in dotenv_values(root / ".env.example").items() if v is not None}
    Settings.from_env(values)
    BotSettings.from_env(values)
    read = variables_read(root)
    assert read <= set(values) | {"DISCORD_TOKEN"}, read - set(values)


def variables_read(root):
    """Every environment variable the code reads (by name, as a string), but the one the
    bot sets for its own training rounds."""
    import re

    sources = "\n".join(
        p.read_text() for p in [*root.glob("storyengine/**/*.py"), *root.glob("bot/**/*.py")]
    )
    read = set(re.findall(r'"((?:STORY|BOT|TRAIN)_[A-Z_]+|DEV_GUILD_ID|DISCORD_TOKEN)"', sources))
    return read - {"STORY_PARENT_PID"}


def test_the_readme_table_explains_every_setting():
    """README's Configuration table has a row for every variable the code reads."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])}
    assert variables_read(root) <= named, variables_read(root) - named


def test_storage_options_are_never_silently_dropped():
    """`--db`/`--dir` live on the commands that use them; one given before a subcommand
    is refused instead of being reset to the default by the subcommand."""
    from storyengine.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["adapters", "list", "--db", "x.db", "--dir", "ads"])
    assert (str(args.db), str(args.dir)) == ("x.db", "ads")
    args = parser.parse_args(["train", "round", "--db", "x.db", "--dir", "ads"])
    assert (str(args.db), str(args.dir)) == ("x.db", "ads")
    with pytest.raises(SystemExit):
        parser.parse_args(["adapters", "--db", "x.db", "list"])


def test_one_data_directory_holds_the_database_adapters_and_logs(tmp_path):
    """STORY_DATA_DIR gives every path its default; each can still be set on its own;
    without it, everything stays where it always was (the working directory)."""
    data = tmp_path / "data"
    settings = Settings.from_env({"STORY_DATA_DIR": str(data)})
    assert settings.data_dir == data
    assert settings.db_path == data / "taleweaver.db"
    assert settings.adapter_dir == data / "adapters"
    assert settings.round_log_dir == data / "logs"

    own = Settings.from_env(
        {
            "STORY_DATA_DIR": str(data),
            "STORY_DB_PATH": "/srv/stories.db",
            "STORY_ADAPTER_DIR": "/srv/adapters",
            "STORY_LOG_DIR": "/var/log/taleweaver",
        }
    )
    assert str(own.db_path) == "/srv/stories.db"
    assert str(own.adapter_dir) == "/srv/adapters"
    assert str(own.round_log_dir) == "/var/log/taleweaver"

    default = Settings.from_env({})
    assert str(default.db_path) == "taleweaver.db" and str(default.adapter_dir) == "adapters"
    assert default.round_log_dir == default.adapter_dir / "logs"

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^STORY_DATA_DIR: "):
        Settings.from_env({"STORY_DATA_DIR": str(tmp_path / "file")})


def test_the_bot_logs_at_info_and_the_cli_at_warning_unless_told():
    assert Settings.from_env({}).log_level == "WARNING"
    assert Settings.from_env({}, default_log_level="INFO").log_level == "INFO"
    told = Settings.from_env({"STORY_LOG_LEVEL": "error"}, default_log_level="INFO")
    assert told.log_level == "ERROR"


@pytest.mark.parametrize(
    "changes, variable",
    [
        ({"max_batch_size": 0}, "STORY_MAX_BATCH_SIZE"),
        ({"max_tokens_in_flight": 10}, "STORY_MAX_TOKENS_IN_FLIGHT"),
        ({"turn_timeout_s": 8 * 86400}, "STORY_TURN_TIMEOUT"),
        ({"best_of": 9}, "STORY_BEST_OF"),
        ({"max_loaded_adapters": 0}, "STORY_MAX_LOADED_ADAPTERS"),
        ({"max_input_chars": 5}, "STORY_MAX_INPUT_CHARS"),
        ({"device": "tpu"}, "STORY_DEVICE"),
        ({"log_level": "LOUD"}, "STORY_LOG_LEVEL"),
    ],
)
def test_settings_made_in_code_are_checked_as_the_environment_is(changes, variable):
    """A library user's `Settings(max_batch_size=0)` used to be accepted (only `from_env`
    checked) and failed later, far from its cause."""
    with pytest.raises(ConfigError, match=f"^{variable}:"):
        Settings(**changes)
    with pytest.raises(ConfigError, match=f"^{variable}:"):
        Settings().replace(**changes)


def test_the_bots_options_take_the_engines_bounds():
    from bot.cogs.story import StoryCog
    from storyengine.config import LIMITS
    from storyengine.sampling import MAX_BEST_OF

    settings = next(c for c in StoryCog.__cog_app_commands__ if c.name == "settings")
    options = {p.name: p for p in settings.parameters}
    assert (options["turn_timeout"].min_value, options["turn_timeout"].max_value) == tuple(
        LIMITS["turn_timeout_s"][1:]
    )
    assert options["best_of"].max_value == MAX_BEST_OF == LIMITS["best_of"][2]


def described_variables():
    """Every variable a settings field reads, from the fields themselves."""
    from bot.settings import BotSettings
    from storyengine.config import SAMPLING_VARS
    from storyengine.options import described

    fields = [f for cls in (Settings, BotSettings) for f, _ in described(cls)]
    return {f.metadata["env"] for f in fields if f.metadata["env"]} | set(SAMPLING_VARS.values())


def test_each_setting_is_described_once_and_documented_everywhere():
    """The fields are the one source: each has its variable and its help; `.env.example`
    lists exactly those variables (and the token, and the progress style the progress
    module reads), and README's table explains each."""
    import dataclasses
    import re
    from pathlib import Path

    from dotenv import dotenv_values

    from bot.settings import BotSettings

    for cls in (Settings, BotSettings):
        for f in dataclasses.fields(cls):
            if f.name == "sampling":  # the preset plus SAMPLING_VARS
                continue
            assert f.metadata.get("env") and f.metadata.get("help"), f"{cls.__name__}.{f.name}"
    root = Path(__file__).resolve().parents[2]
    example = set(dotenv_values(root / ".env.example"))
    assert example == described_variables() | {"DISCORD_TOKEN", "STORY_PROGRESS"}
    readme = (root / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([A-Z_]+)`", row)}
    assert described_variables() - named == set()


def test_bot_settings_made_in_code_are_checked():
    from bot.settings import BotSettings

    with pytest.raises(ConfigError, match=r"^BOT_EDIT_INTERVAL:"):
        BotSettings(edit_interval_s=0.0)
    with pytest.raises(ConfigError, match=r"^BOT_HEALTH_PORT:"):
        BotSettings(health_port=70000)
    with pytest.raises(ConfigError, match=r"^TRAIN_MIN_NEW_FEEDBACK: expected a whole number"):
        BotSettings(train_min_new_feedback=2.5)  # type: ignore[arg-type]
    assert BotSettings.from_env({"BOT_HEALTH_PORT": "0"}).health_port == 0


def test_a_database_password_stays_out_of_reprs_and_messages():
    settings = Settings.from_env({"STORY_DB_URL": "postgresql://bot:s3cret@db/taleweaver"})
    assert settings.db_url == "postgresql://bot:s3cret@db/taleweaver"
    assert "s3cret" not in repr(settings)
    assert settings.database_shown == "postgresql://bot:***@db/taleweaver"
    with pytest.raises(ConfigError, match=r"^STORY_DB_URL: expected a postgresql:// URL"):
        Settings.from_env({"STORY_DB_URL": "mysql://x"})
