"""Best-of-n at serving time: which reward model ranks a story's candidates.

Once a reward model is promoted (a community's own, else the shared one), the engine
writes `best_of` candidates per turn (one shared prefill in the scheduler), scores them
here, shows the best and keeps the others as the turn's alternatives.

The reward model reads a frozen copy of the base model of its own (`base_copy`), made
the first time one is needed: the serving model carries LoRA adapters that the scheduler
loads and switches per row, and a second reader on the same modules could see them
change under it; its tokenizer is copied too (a fast tokenizer is not safe to share
between threads). A copy is cheap for the bundled model (about 70 MB in float32) and
doubles the weights' memory for a large one; with no reward model promoted, nothing is
copied. Scoring runs in a worker thread, one call at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Settings
    from ..serving.modeling import LoadedModel
    from ..storage import RewardModelRecords
    from .reward import FeatureMemo

log = logging.getLogger(__name__)

Scorer = Callable[[Sequence[str], Sequence[str]], Awaitable[list[float]]]
"""(prompts, continuations) → a reward for each (higher: the audience likes it more)."""


def base_copy(loaded: LoadedModel) -> LoadedModel:
    """A private copy of the serving model's base: no adapters, its own tokenizer.

    The weights are copied into a new model of the same class, not the modules: once
    adapters are loaded for serving, the modules carry peft's LoRA layers and the
    scheduler's per-row adapter state (thread-locals), which cannot be deep-copied and
    must not be shared."""
    import copy

    from ..serving.modeling import LoadedModel

    with loaded.mutation_lock:  # not while adapters are being loaded
        model = loaded.model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        state = {
            key.replace(".base_layer.", "."): value.detach().clone()
            for key, value in inner.state_dict().items()
            if "lora_" not in key  # peft's A and B matrices, per adapter
        }
        tokenizer = copy.deepcopy(loaded.tokenizer)
    first = next(iter(state.values()))
    fresh = type(inner)(copy.deepcopy(inner.config))
    fresh.load_state_dict(state, strict=True)
    fresh.to(device=first.device, dtype=first.dtype)
    fresh.eval()
    return LoadedModel(fresh, tokenizer, loaded.model_id, None, loaded.device)


class RewardSource:
    def __init__(
        self,
        settings: Settings,
        store: RewardModelRecords,
        serving: Callable[[], LoadedModel | None],
        *,
        keep: int = 4,
    ) -> None:
        """`serving`: the serving model, whose base the reward models read; None when
        the generator runs the model elsewhere (then the base model is loaded here, from
        the settings, the first time a reward model is needed)."""
        from .reward import RewardRegistry, reward_dir

        self.serving = serving
        self.settings = settings
        self.registry = RewardRegistry(store, reward_dir(settings), lock_dir=settings.adapter_dir)
        self.keep = keep
        self._base: Any = None
        self._loaded: OrderedDict[int, Any] = OrderedDict()
        self._lock = asyncio.Lock()

    async def serving_version(self, community: str | None) -> Any:
        """The reward model version that ranks a community's stories: its own promoted
        one, else the shared lineage's; None when neither is (best-of-n is off)."""
        return await self.registry.serving(community)

    async def scorer(
        self, community: str | None, *, memos: dict[Any, FeatureMemo] | None = None
    ) -> Scorer | None:
        """The scorer for a community's stories (`serving_version`'s), or None when no reward
        model is promoted for it or for the shared lineage (then best-of-n is off).
        `memos`: the base model's features by feature spec, kept across calls and reward
        models (`RewardModel.score`), for a caller that ranks the same texts again."""
        version = await self.serving_version(community)
        if version is None:
            return None
        model = await self._load(version)
        if model is None:
            return None
        memo = memos.setdefault(model.spec, {}) if memos is not None else None

        async def score(prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
            async with self._lock:
                return await asyncio.to_thread(
                    partial(model.score, memo=memo), list(prompts), list(continuations)
                )

        return score

    def _read_base(self) -> LoadedModel:
        serving = self.serving()
        if serving is not None:
            return base_copy(serving)
        from ..serving.modeling import load_model

        return load_model(self.settings.replace(adapter=None))

    async def _load(self, version: Any) -> Any:
        if version.version in self._loaded:
            self._loaded.move_to_end(version.version)
            return self._loaded[version.version]
        async with self._lock:
            try:
                if self._base is None:
                    self._base = await asyncio.to_thread(self._read_base)
                model = await asyncio.to_thread(self.registry.load, version, self._base)
            except Exception:  # a broken file must not stop the stories: no best-of-n
                log.exception("could not load reward model %s; writing one candidate", version)
                return None
        self._loaded[version.version] = model
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        log.info("ranking candidates with reward model %s", version.name)
        return model
