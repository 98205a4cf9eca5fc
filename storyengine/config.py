"""Settings: the one place that reads the environment.

`Settings.from_env()` reads the process environment (after loading a `.env` file, if
any) and validates every value; a bad one raises `ConfigError` with a one-line message
that names the variable. Everything else receives a `Settings` object.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, InvalidInput
from .sampling import DEFAULT_PRESET, SamplingParams, preset

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


LIMITS: dict[str, tuple[str, int, int | None]] = {
    "max_batch_size": ("STORY_MAX_BATCH_SIZE", 1, 256),
    "max_tokens_in_flight": ("STORY_MAX_TOKENS_IN_FLIGHT", 1024, None),
    "turn_timeout_s": ("STORY_TURN_TIMEOUT", 30, 7 * 86400),
    "best_of": ("STORY_BEST_OF", 1, 8),
    "max_loaded_adapters": ("STORY_MAX_LOADED_ADAPTERS", 1, 256),
}
"""Whole-number settings: field → (environment variable, lowest, highest or None). The
one place their bounds are written: `Settings` checks them whenever one is made, and the
bot's options take theirs from here."""
MAX_INPUT_CHARS = (20, 4000)
"""`STORY_MAX_INPUT_CHARS`'s bounds (a `generate` call may raise the ceiling for its own
prompt)."""
MAX_ID = 2**63 - 1
"""Largest id a database row can have (SQLite's INTEGER)."""
MAX_NOTE_CHARS = 400
"""A memory, an author's note or a lore card's text, at most."""
MAX_LORE_CARDS = 50
MAX_LORE_NAME = 60
MAX_TRIGGERS = 10
MAX_TRIGGER_CHARS = 40
MAX_GENRE_CHARS = 40
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs to run. Each field maps to one `STORY_*` variable."""

    db_path: Path = Path("taleweaver.db")
    base_model: str = BUNDLED_MODEL
    adapter: str | None = None
    adapter_dir: Path = Path("adapters")
    data_dir: Path = Path(".")
    """`STORY_DATA_DIR`: where the database, the adapter registry and the logs go unless
    each is set on its own (`from_env` derives their defaults from it)."""
    log_dir: Path | None = None
    """Where training rounds write their logs; None: `<adapter_dir>/logs`."""
    device: str = "auto"
    dtype: str = "auto"
    preset: str = DEFAULT_PRESET
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_input_chars: int = 1000
    blocklist: tuple[str, ...] = ()
    log_level: str = "WARNING"
    max_batch_size: int = 16
    max_tokens_in_flight: int = 32768
    turn_timeout_s: int = 600
    best_of: int = DEFAULT_BEST_OF
    """Continuations written per turn once a reward model is served (a channel may set
    its own); 1 turns best-of-n off."""
    max_loaded_adapters: int = 8
    """Adapters kept loaded for serving at once (communities' own and the shared one);
    others are loaded again when next needed."""
    reaction_values: tuple[tuple[str, float], ...] = DEFAULT_REACTION_VALUES
    generator: str = "batching"
    """`STORY_GENERATOR`: what runs the model (`generators.GENERATORS`): `batching`, the
    continuous-batching scheduler, or `sequential`, one request at a time."""
    generator_url: str | None = None
    """`STORY_GENERATOR_URL`: an OpenAI-compatible completions service that runs the
    model (`storyengine serve`, vLLM, llama.cpp's server), e.g.
    `http://gpu-box:8000/v1`; set, it replaces `generator`."""

    def __post_init__(self) -> None:
        """Every settings object is valid, however it was made (`from_env`, a test, a
        library user); a bad value raises `ConfigError` naming its variable."""
        for name, (variable, low, high) in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{variable}: expected a whole number, got {value!r}")
            if value < low or (high is not None and value > high):
                span = f"{low}..{high}" if high is not None else f"at least {low}"
                raise ConfigError(f"{variable}: must be {span}, got {value}")
        if self.max_input_chars < MAX_INPUT_CHARS[0]:
            raise ConfigError(
                f"STORY_MAX_INPUT_CHARS: must be at least {MAX_INPUT_CHARS[0]}, "
                f"got {self.max_input_chars}"
            )
        device = self.device.lower()
        if not (device in {"auto", "cpu", "mps"} or device.startswith("cuda")):
            raise ConfigError(
                f"STORY_DEVICE: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}"
            )
        if self.dtype.lower() not in DTYPES:
            raise ConfigError(
                f"STORY_DTYPE: expected auto, float32, float16 or bfloat16, got {self.dtype!r}"
            )
        if self.generator not in ("batching", "sequential"):
            raise ConfigError(
                f"STORY_GENERATOR: expected batching or sequential, got {self.generator!r}"
            )
        if self.generator_url is not None and not self.generator_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"STORY_GENERATOR_URL: expected an http:// or https:// address, "
                f"got {self.generator_url!r}"
            )
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(
                f"STORY_LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"
            )

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
        env = _Env(environ)

        preset_name = env.get("STORY_PRESET", DEFAULT_PRESET, str)
        try:
            base = preset(preset_name).params
        except InvalidInput as exc:
            raise ConfigError(f"STORY_PRESET: {exc}") from None
        sampling = base
        for key, (var, kind) in _SAMPLING_VARS.items():
            value = env.get(var, None, kind)
            if value is None:
                continue
            try:
                sampling = sampling.replace(**{key: value})
            except InvalidInput as exc:
                raise ConfigError(f"{var}: {exc}") from None

        device = env.get("STORY_DEVICE", "auto", str).lower()
        dtype = env.get("STORY_DTYPE", "auto", str).lower()
        max_input = env.get("STORY_MAX_INPUT_CHARS", 1000, int)
        if not MAX_INPUT_CHARS[0] <= max_input <= MAX_INPUT_CHARS[1]:
            low, high = MAX_INPUT_CHARS
            raise ConfigError(f"STORY_MAX_INPUT_CHARS: must be {low}..{high}, got {max_input}")
        log_level = env.get("STORY_LOG_LEVEL", default_log_level, str).upper()
        base_model = env.get("STORY_BASE_MODEL", BUNDLED_MODEL, str) or BUNDLED_MODEL
        adapter = env.get("STORY_ADAPTER", "", str) or None
        if adapter is not None and not Path(adapter).is_dir():
            raise ConfigError(
                f"STORY_ADAPTER: {adapter!r} is not a directory holding a LoRA adapter"
            )
        defaults = cls.__dataclass_fields__
        limited = {
            name: env.get(variable, defaults[name].default, int)
            for name, (variable, _, _) in LIMITS.items()
        }
        reactions = _parse_reaction_values(env.get("STORY_REACTION_VALUES", "", str))
        blocklist = tuple(
            w.strip().lower() for w in env.get("STORY_BLOCKLIST", "", str).split(",") if w.strip()
        )
        data_dir = Path(env.get("STORY_DATA_DIR", ".", str)).expanduser()
        if data_dir.exists() and not data_dir.is_dir():
            raise ConfigError(f"STORY_DATA_DIR: {str(data_dir)!r} is a file, not a directory")
        # Set on its own, a path is taken as given; else it goes in the data directory.
        # Without STORY_DATA_DIR the logs stay where they always were, in the registry.
        log_dir = env.get("STORY_LOG_DIR", "", str)
        data_dir_set = bool((environ.get("STORY_DATA_DIR") or "").strip())
        return cls(
            db_path=Path(env.get("STORY_DB_PATH", "", str) or data_dir / "taleweaver.db"),
            base_model=base_model,
            adapter=adapter,
            adapter_dir=Path(env.get("STORY_ADAPTER_DIR", "", str) or data_dir / "adapters"),
            data_dir=data_dir,
            log_dir=Path(log_dir) if log_dir else (data_dir / "logs" if data_dir_set else None),
            device=device,
            dtype=dtype,
            preset=preset_name.lower(),
            sampling=sampling,
            max_input_chars=max_input,
            blocklist=blocklist,
            log_level=log_level,
            reaction_values=reactions,
            generator=env.get("STORY_GENERATOR", "batching", str).lower(),
            generator_url=env.get("STORY_GENERATOR_URL", "", str) or None,
            **limited,
        )


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


_SAMPLING_VARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temperature": ("STORY_TEMPERATURE", float),
    "top_p": ("STORY_TOP_P", float),
    "top_k": ("STORY_TOP_K", int),
    "repetition_penalty": ("STORY_REPETITION_PENALTY", float),
    "no_repeat_ngram_size": ("STORY_NO_REPEAT_NGRAM_SIZE", int),
    "max_new_tokens": ("STORY_MAX_NEW_TOKENS", int),
}


class _Env:
    """Typed access to environment variables with errors that name the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str, default: Any, kind: Callable[[str], Any]) -> Any:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return kind(raw.strip())
        except ValueError:
            expected = {int: "a whole number", float: "a number"}.get(kind, "a value")  # type: ignore[call-overload]
            raise ConfigError(f"{name}: expected {expected}, got {raw.strip()!r}") from None
