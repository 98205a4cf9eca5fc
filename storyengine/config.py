"""Settings: the one place that reads the environment.

`Settings.from_env()` reads the process environment (after loading a `.env` file, if
any) and validates every value; a bad one raises `ConfigError` with a one-line message
that names the variable. Everything else receives a `Settings` object.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, InvalidInput
from .options import check_settings, described, option, parse_setting, read_env
from .sampling import DEFAULT_PRESET, MAX_BEST_OF, PRESETS, SamplingParams, preset

DEFAULT_REACTION_VALUES: tuple[tuple[str, float], ...] = (
    ("👍", 1.0),
    ("👎", -1.0),
    ("❤️", 1.0),
    ("⭐", 1.0),
)

DEFAULT_BEST_OF = 3
"""Measured on 2 CPU cores at 16 channels (README, `bench serve --best-of`): best-of-3's
p95 latency stayed within 1.2-1.8 times best-of-1's in every run; best-of-4 went past
twice in two runs of six."""

BUNDLED_MODEL = "bundled"
"""`STORY_BASE_MODEL` value (the default) that selects the model shipped in the package."""


def bundled_model_path() -> Path:
    return Path(__file__).resolve().parent / "models" / "tinystories-gpt2"


MAX_INPUT_CHARS = (20, 4000)
"""`STORY_MAX_INPUT_CHARS`'s bounds (a `generate` call may raise the ceiling for its own
prompt, so a settings object made in code checks only the floor)."""
MAX_ID = 2**63 - 1
"""Largest id a database row can have (SQLite's INTEGER)."""
MAX_NOTE_CHARS = 400
"""A memory, an author's note or a lore card's text, at most."""
MAX_LORE_CARDS = 50
MAX_LORE_NAME = 60
MAX_TRIGGERS = 10
MAX_TRIGGER_CHARS = 40
MAX_GENRE_CHARS = 40
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
GENERATORS = ("batching", "sequential")


def _device(value: str) -> str | None:
    device = value.lower()
    ok = device in {"auto", "cpu", "mps"} or device.startswith("cuda")
    return None if ok else "auto, cpu, cuda, cuda:N or mps"


def _url(value: str) -> str | None:
    return None if value.startswith(("http://", "https://")) else "an http:// or https:// address"


def _adapter_dir(raw: str) -> str:
    if not Path(raw).is_dir():
        raise ValueError(f"{raw!r} is not a directory holding a LoRA adapter")
    return raw


def _preset_name(raw: str) -> str:
    try:
        return preset(raw).name
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def _words(raw: str) -> tuple[str, ...]:
    return tuple(w.strip().lower() for w in raw.split(",") if w.strip())


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs to run. Each field says its `STORY_*` variable, its
    help and its bounds (`options.option`); `from_env` reads them all in one loop, and
    every object is checked when it is made, however it was made."""

    db_path: Path = option(
        Path("taleweaver.db"),
        env="STORY_DB_PATH",
        help="SQLite file holding stories, turns, notes and every generation record "
        "(default: taleweaver.db in STORY_DATA_DIR)",
    )
    db_url: str | None = option(
        None,
        env="STORY_DB_URL",
        secret=True,  # it may hold a password
        check=lambda url: (
            None if url.startswith(("postgresql://", "postgres://")) else "a postgresql:// URL"
        ),
        help="a PostgreSQL database instead of the SQLite file, for several processes "
        "sharing the data: postgresql://user:password@host:5432/taleweaver",
    )
    base_model: str = option(
        BUNDLED_MODEL,
        env="STORY_BASE_MODEL",
        help="bundled (the story model shipped in the package), a Hugging Face causal LM id "
        "or a local directory",
    )
    adapter: str | None = option(
        None,
        env="STORY_ADAPTER",
        parse=_adapter_dir,
        help="a directory with a LoRA adapter to apply on top (instead of the registry's)",
    )
    adapter_dir: Path = option(
        Path("adapters"),
        env="STORY_ADAPTER_DIR",
        help="the adapter registry (default: adapters/ in STORY_DATA_DIR)",
    )
    data_dir: Path = option(
        Path("."),
        env="STORY_DATA_DIR",
        check=lambda path: "a directory" if path.exists() and not path.is_dir() else None,
        help="where the database, the adapter registry and the logs go unless each is set "
        "on its own",
    )
    log_dir: Path | None = option(
        None,
        env="STORY_LOG_DIR",
        help="where training rounds write their logs (default: logs/ in STORY_DATA_DIR when "
        "that is set, else <adapter_dir>/logs)",
    )
    device: str = option(
        "auto",
        env="STORY_DEVICE",
        parse=str.lower,
        check=_device,
        help="auto, cpu, cuda, cuda:N or mps",
    )
    dtype: str = option(
        "auto", env="STORY_DTYPE", parse=str.lower, choices=DTYPES, help="the model's weights' type"
    )
    preset: str = option(
        DEFAULT_PRESET,
        env="STORY_PRESET",
        parse=_preset_name,
        choices=tuple(PRESETS),
        help="the style preset the sampling defaults start from",
    )
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """The preset's parameters with the `STORY_TEMPERATURE`... overrides (`SAMPLING_VARS`)."""
    max_input_chars: int = option(
        1000,
        env="STORY_MAX_INPUT_CHARS",
        low=MAX_INPUT_CHARS[0],
        help="longest text a user may send at once",
    )
    blocklist: tuple[str, ...] = option(
        (), env="STORY_BLOCKLIST", parse=_words, help="words masked in the storyteller's output"
    )
    log_level: str = option(
        "WARNING", env="STORY_LOG_LEVEL", parse=str.upper, choices=LOG_LEVELS, help="log level"
    )
    max_batch_size: int = option(
        16,
        env="STORY_MAX_BATCH_SIZE",
        low=1,
        high=256,
        help="most stories written at the same time in one batch",
    )
    max_tokens_in_flight: int = option(
        32768,
        env="STORY_MAX_TOKENS_IN_FLIGHT",
        low=1024,
        help="bound on prompt + reply tokens of the stories being written at once",
    )
    turn_timeout_s: int = option(
        600,
        env="STORY_TURN_TIMEOUT",
        low=30,
        high=7 * 86400,
        help="round-robin: seconds before an untaken turn passes to the next player",
    )
    best_of: int = option(
        DEFAULT_BEST_OF,
        env="STORY_BEST_OF",
        low=1,
        high=MAX_BEST_OF,
        help="continuations written per turn once a reward model is served, the best shown "
        "(a channel may set its own; 1: off)",
    )
    max_loaded_adapters: int = option(
        8,
        env="STORY_MAX_LOADED_ADAPTERS",
        low=1,
        high=256,
        help="adapters kept loaded for serving at once; others are loaded again when needed",
    )
    reaction_values: tuple[tuple[str, float], ...] = option(
        DEFAULT_REACTION_VALUES,
        env="STORY_REACTION_VALUES",
        parse=lambda raw: _parse_reaction_values(raw),
        help="what each reaction counts as, EMOJI=VALUE pairs",
    )
    generator: str = option(
        "batching",
        env="STORY_GENERATOR",
        parse=str.lower,
        choices=GENERATORS,
        help="what runs the model: the continuous-batching scheduler or one request at a time",
    )
    generator_url: str | None = option(
        None,
        env="STORY_GENERATOR_URL",
        check=_url,
        help="an OpenAI-compatible completions service that runs the model instead "
        "(storyengine serve, vLLM, llama.cpp's server)",
    )
    image_model: str | None = option(
        None,
        env="STORY_IMAGE_MODEL",
        help="illustrations drawn here: a diffusers text-to-image pipeline, a Hugging Face id "
        "or a local folder (pip install 'taleweaver[images]')",
    )
    image_url: str | None = option(
        None,
        env="STORY_IMAGE_URL",
        check=_url,
        help="illustrations drawn by an OpenAI-compatible image service "
        "(POST /v1/images/generations) instead",
    )
    image_api_key: str | None = option(
        None, env="STORY_IMAGE_API_KEY", secret=True, help="the image service's API key, if any"
    )
    image_service_model: str | None = option(
        None,
        env="STORY_IMAGE_SERVICE_MODEL",
        help="the model name sent to the image service (some need one)",
    )
    image_size: int = option(
        512,
        env="STORY_IMAGE_SIZE",
        low=16,
        high=2048,
        check=lambda size: None if size % 8 == 0 else "a multiple of 8",
        help="pictures' width and height in pixels",
    )
    image_steps: int = option(
        25,
        env="STORY_IMAGE_STEPS",
        low=1,
        high=200,
        help="denoising steps per picture drawn by STORY_IMAGE_MODEL",
    )
    image_queue: int = option(
        4,
        env="STORY_IMAGE_QUEUE",
        low=0,
        high=100,
        help="pictures that may wait while others are drawn; more are refused until the "
        "queue moves",
    )
    image_timeout_s: float = option(
        300.0,
        env="STORY_IMAGE_TIMEOUT",
        above=0,
        high=3600,
        help="seconds to wait for the image service's answer",
    )
    image_style: str = option(
        "a storybook illustration, soft colours, no text",
        env="STORY_IMAGE_STYLE",
        help="added to every picture's prompt",
    )

    def __post_init__(self) -> None:
        """Every settings object is valid, however it was made (`from_env`, a test, a
        library user); a bad value raises `ConfigError` naming its variable."""
        check_settings(self)
        if self.image_model and self.image_url:
            raise ConfigError(
                "STORY_IMAGE_MODEL and STORY_IMAGE_URL: set one (a model drawn here, or a "
                "service that draws)"
            )

    @property
    def database(self) -> Path | str:
        """Where the stories are kept: the PostgreSQL URL when set, else the SQLite file
        (what `Store` is made with)."""
        return self.db_url or self.db_path

    @property
    def database_shown(self) -> str:
        """The database as said to a person: the URL without its password, or the
        SQLite file's absolute path."""
        return redact_url(self.db_url) if self.db_url else str(self.db_path.resolve())

    @property
    def has_database(self) -> bool:
        """Whether there is a database to read (a URL is taken to name one; a SQLite
        file must exist): what looks must never create one."""
        return self.db_url is not None or self.db_path.exists()

    @property
    def uses_bundled_model(self) -> bool:
        return self.base_model == BUNDLED_MODEL

    @property
    def round_log_dir(self) -> Path:
        """The folder of the training rounds' logs."""
        return self.log_dir if self.log_dir is not None else self.adapter_dir / "logs"

    @property
    def model_path(self) -> str:
        """What to hand to `from_pretrained`: a directory or a Hugging Face id."""
        return str(bundled_model_path()) if self.uses_bundled_model else self.base_model

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        dotenv: bool = True,
        default_log_level: str = "WARNING",
    ) -> Settings:
        """Build settings from `environ` (default: `os.environ`, after loading `.env`).
        `default_log_level` applies when `STORY_LOG_LEVEL` is not set (the bot says more
        than the CLI)."""
        if environ is None:
            if dotenv:
                from dotenv import find_dotenv, load_dotenv

                # The working directory's `.env` (not one above the installed package).
                load_dotenv(find_dotenv(usecwd=True), override=False)
            environ = os.environ
        values = read_env(cls, environ)
        values.setdefault("log_level", default_log_level.upper())
        if values.get("max_input_chars", 0) > MAX_INPUT_CHARS[1]:
            low, high = MAX_INPUT_CHARS
            raise ConfigError(
                f"STORY_MAX_INPUT_CHARS: must be {low}..{high}, got {values['max_input_chars']}"
            )
        values["sampling"] = _sampling(values.get("preset", DEFAULT_PRESET), environ)
        # Set on its own, a path is taken as given; else it goes in the data directory.
        # Without STORY_DATA_DIR the logs stay where they always were, in the registry.
        if "data_dir" in values:
            data_dir = values["data_dir"]
            values.setdefault("db_path", data_dir / "taleweaver.db")
            values.setdefault("adapter_dir", data_dir / "adapters")
            values.setdefault("log_dir", data_dir / "logs")
        return cls(**values)


SAMPLING_VARS: dict[str, str] = {
    "temperature": "STORY_TEMPERATURE",
    "top_p": "STORY_TOP_P",
    "top_k": "STORY_TOP_K",
    "repetition_penalty": "STORY_REPETITION_PENALTY",
    "no_repeat_ngram_size": "STORY_NO_REPEAT_NGRAM_SIZE",
    "max_new_tokens": "STORY_MAX_NEW_TOKENS",
}
"""The sampling defaults the environment may override: `SamplingParams` field →
variable (the parameters check their own values)."""


def _sampling(preset_name: str, environ: Mapping[str, str]) -> SamplingParams:
    """The preset's parameters with the environment's overrides."""
    sampling = preset(preset_name).params
    defaults = SamplingParams()
    for key, variable in SAMPLING_VARS.items():
        raw = (environ.get(variable) or "").strip()
        if not raw:
            continue
        kind = int if isinstance(getattr(defaults, key), int) else float
        value = parse_setting(variable, raw, kind)
        try:
            sampling = sampling.replace(**{key: value})
        except InvalidInput as exc:
            raise ConfigError(f"{variable}: {exc}") from None
    return sampling


LIMITS: dict[str, tuple[str, int, int | None]] = {
    f.name: (f.metadata["env"], f.metadata["low"], f.metadata["high"])
    for f, kind in described(Settings)
    if kind is int and f.metadata["low"] is not None
}
"""Whole-number settings with bounds: field → (variable, lowest, highest or None), read
from the fields (the bot's options take theirs from here)."""


def _parse_reaction_values(raw: str) -> tuple[tuple[str, float], ...]:
    """`👍=1,👎=-1,❤️=1` → pairs; empty → the defaults."""
    if not raw.strip():
        return DEFAULT_REACTION_VALUES
    pairs = []
    for item in raw.split(","):
        emoji, sep, value = item.strip().partition("=")
        try:
            if not sep or not emoji.strip():
                raise ValueError
            pairs.append((emoji.strip(), float(value)))
        except ValueError:
            raise ConfigError(
                f"STORY_REACTION_VALUES: expected EMOJI=NUMBER pairs separated by commas, "
                f"got {item.strip()!r}"
            ) from None
    return tuple(pairs)


def redact_url(url: str) -> str:
    """`postgresql://user:secret@host/db` → `postgresql://user:***@host/db`: secrets
    never reach logs or messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
