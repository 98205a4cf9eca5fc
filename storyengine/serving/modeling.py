"""Loading the base model, its tokenizer and an optional LoRA adapter."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class TokenizedText:
    """Text and tokens by a model's tokenizer (`self.tokenizer`): what `ModelInfo` asks
    for, the same wherever the model runs."""

    tokenizer: PreTrainedTokenizerBase

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a user typing "<|endoftext|>" gets those characters
        # encoded as plain text, never the control token itself.
        return list(self.tokenizer(text, split_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    @property
    def special_tokens(self) -> list[str]:
        """The tokenizer's control tokens, as text (the safety filter removes them from
        what people type)."""
        return list(self.tokenizer.all_special_tokens)


@dataclass
class LoadedModel(TokenizedText):
    """A causal LM ready to generate, with what identifies it in generation records."""

    model: Any
    """A transformers `PreTrainedModel`, or a peft `PeftModel` around one when adapters
    are loaded (typed loosely: the scheduler reaches into both)."""
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    adapter_id: str | None
    device: torch.device
    default_adapter: str | None = None
    """The adapter a request without one of its own runs with (None: the base model)."""
    mutation_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Held while adapters are loaded or deleted, and by a generation that runs outside
    the thread doing that (beam search beside the batch), so neither sees the other's
    half-changed model."""

    def __post_init__(self) -> None:
        if self.default_adapter is None and self.is_peft:
            self.default_adapter = str(self.model.active_adapter)

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter (peft format) under `name`, wrapping the model with peft
        the first time. Call it where no forward pass is running (a generator's worker)."""
        from peft import PeftModel

        if self.is_peft:
            if name not in self.model.peft_config:
                self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()

    def delete_adapter(self, name: str) -> bool:
        """Unload an adapter no request uses any more (same rules as `load_adapter`).
        False when it stays: not loaded, or the model's last one (peft keeps one)."""
        if self.is_peft and name in self.model.peft_config and len(self.model.peft_config) > 1:
            self.model.delete_adapter(name)
            return True
        return False

    @property
    def context_window(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    @property
    def is_peft(self) -> bool:
        """True when the model carries LoRA adapters (a peft model)."""
        return hasattr(self.model, "peft_config")

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)  # pyright: ignore[reportArgumentType]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_id)  # pyright: ignore[reportArgumentType]

    def describe(self) -> str:
        """Where and how it runs, for the start-up log: `cpu, float32`."""
        dtype = str(getattr(self.model, "dtype", "?")).removeprefix("torch.")
        return f"{self.device}, {dtype}"


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"STORY_DEVICE: {name!r} asked for, but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("STORY_DEVICE: 'mps' asked for, but MPS is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        # Half precision only where it is fast; float32 on the CPU.
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(settings: Settings) -> LoadedModel:
    """Load the configured base model (and adapter). The bundled model never touches the
    network; any other id is resolved by Hugging Face as usual."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tokenizer = load_tokenizer(settings)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            settings.model_path, dtype=dtype, **_offline(settings)
        )
    except OSError as exc:
        raise ConfigError(f"STORY_BASE_MODEL: cannot load {settings.base_model!r}: {exc}") from None
    model_id = "bundled:tinystories-gpt2" if settings.uses_bundled_model else settings.base_model
    adapter_id = None
    if settings.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, settings.adapter, adapter_name="default")
        adapter_id = "default"
    model.to(device)  # pyright: ignore[reportArgumentType]
    model.eval()
    log.info("loaded %s (adapter %s) on %s as %s", model_id, adapter_id, device, dtype)
    return LoadedModel(model, tokenizer, model_id, adapter_id, device)


def load_tokenizer(settings: Settings) -> PreTrainedTokenizerBase:
    """The configured base model's tokenizer alone (a generator that runs the model
    elsewhere needs only this here), with a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model_path, **_offline(settings))
    except OSError as exc:
        raise ConfigError(f"STORY_BASE_MODEL: cannot load {settings.base_model!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _offline(settings: Settings) -> dict[str, Any]:
    """The bundled model never touches the network."""
    return {"local_files_only": True} if settings.uses_bundled_model else {}


def load_for_training(settings: Settings) -> LoadedModel:
    """The base model alone, for a trainer: in float32 (half-precision weights would
    train without loss scaling), unless bfloat16 was asked for."""
    dtype = "bfloat16" if settings.dtype == "bfloat16" else "float32"
    return load_model(settings.replace(adapter=None, dtype=dtype))
