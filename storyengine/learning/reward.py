"""The reward model: a small scorer of continuations learned from the audience's
reactions and companion choices.

Design (chosen by measurement; README "The reward model" says why): the base model
stays frozen and only reads. A continuation, given the end of its prompt (32 tokens),
goes through it once, as far as its middle block; the hidden states of the
continuation's tokens there are mean-pooled, standardised, and a linear head turns them
into one number. The head is trained with a Bradley-Terry loss on preference pairs (the chosen
continuation should score above the rejected one, weighted by the pair's weight) and a
logistic loss on single 👍/👎 labels (weighted by the example's net score, at most
`label_weight_cap`), with an L2 penalty, by L-BFGS. The features are computed once per
continuation, so training on a few hundred examples costs a few forward passes of the
base model and well under a second for the head; nothing of the base model is trained,
so the reward model can never drift, and its file is a few kilobytes.

It learns from the same `FeedbackDatasets` as the adapter (consent, forget-me, vote caps
and the story split apply as they do there). Held-out examples judge it (see
`HeldoutReport` and `gate`); while few are held out, cross-validation over all of
people's feedback does, and the model kept learns from all of it (`cross_validate`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError, InvalidInput
from ..storage import RewardModelRecords
from .datasets import FeedbackDatasets, LabelledExample, PreferencePair
from .evaluation import average_ranks, evidence
from .precision import measuring

if TYPE_CHECKING:
    import torch

    from ..config import Settings
    from ..serving.modeling import LoadedModel

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
SPEC_FILE = "reward.json"
FORMAT = 1
"""The version of the files' layout, stored in `reward.json`."""

POOLINGS = ("mean", "max", "last")


@dataclass(frozen=True)
class FeatureSpec:
    """What the head reads: the base model's hidden states at `depths` (each a share of
    its blocks: 0.5 after the middle one, 1 the last layer's output), pooled over the
    continuation's tokens with each of `pooling`, concatenated."""

    depths: tuple[float, ...] = (0.5,)
    pooling: tuple[str, ...] = ("mean",)
    max_prompt_tokens: int = 32
    """The end of the prompt the continuation is read after: what a continuation means
    depends on the story, most on its last lines; each prompt token costs as much as
    a continuation token."""
    max_completion_tokens: int = 128

    def __post_init__(self) -> None:
        if not self.depths or not self.pooling:
            raise ValueError("a feature spec needs at least one depth and one pooling")
        if any(not 0 < d <= 1 for d in self.depths):
            raise ValueError("depths are shares of the model's blocks, in (0, 1]")
        if unknown := set(self.pooling) - set(POOLINGS):
            raise ValueError(f"unknown pooling {sorted(unknown)}; one of {POOLINGS}")
        if self.max_prompt_tokens < 0 or self.max_completion_tokens < 1:
            raise ValueError("max_prompt_tokens must be 0 or more, max_completion_tokens 1 or more")

    def layers(self, n_layers: int) -> tuple[int, ...]:
        """The depths as indices into a model's `hidden_states` (0: the embeddings)."""
        return tuple(max(1, round(d * n_layers)) for d in self.depths)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(
            depths=tuple(float(x) for x in d["depths"]),
            pooling=tuple(d["pooling"]),
            max_prompt_tokens=int(d["max_prompt_tokens"]),
            max_completion_tokens=int(d["max_completion_tokens"]),
        )


class RewardModelMismatch(ConfigError):
    """A reward model's head was trained on the features of another base model."""


def base_identity(base: LoadedModel) -> dict[str, Any]:
    """What a head's features depend on: the base model's id and shape. A head loads
    only onto a base model with the same identity."""
    config = base.model.config
    if hasattr(base.model, "get_base_model"):  # peft: the model under the adapters
        config = base.model.get_base_model().config
    return {
        "model_id": base.model_id,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        "layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }


def continuation_features(
    base: LoadedModel,
    spec: FeatureSpec,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """One feature row per (prompt, continuation), float32 on the CPU: the base model's
    hidden states over the continuation's tokens (read after the end of the prompt),
    pooled. Batched by length, in inference mode, without any LoRA adapter the model
    carries (per call, so it is safe beside a thread that serves with adapters); the
    forward pass stops at the deepest block the spec reads. In bfloat16 where the CPU
    computes it natively (`precision.measuring`): a reward model is trained and scores
    on features taken the same way."""
    import torch

    from .training import evaluating

    if len(prompts) != len(continuations):
        raise ValueError("as many prompts as continuations, please")
    model = base.model
    n_layers = int(base_identity(base)["layers"])
    layers = spec.layers(n_layers)
    window = base.context_window
    rows: list[tuple[list[int], int]] = []  # (ids, where the continuation starts)
    for prompt, text in zip(prompts, continuations, strict=True):
        completion = base.encode(text)[: spec.max_completion_tokens] or [base.eos_token_id]
        room = max(0, min(spec.max_prompt_tokens, window - len(completion)))
        context = base.encode(prompt)[-room:] if room else []
        rows.append((context + completion, len(context)))
    if not rows:
        return torch.zeros((0, feature_size(base, spec)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out: list[Any] = [None] * len(rows)
    device = next(model.parameters()).device
    with torch.inference_mode(), evaluating(model), measuring(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), base.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            inside = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                tokens, begin = rows[i]
                ids[row, : len(tokens)] = torch.tensor(tokens)
                attention[row, : len(tokens)] = 1
                inside[row, begin : len(tokens)] = True
            hidden = _hidden_states(model, n_layers, layers, ids.to(device), attention.to(device))
            pooled = _pool([hidden[layer] for layer in layers], spec, inside.to(device))
            for row, i in enumerate(chunk):
                out[i] = pooled[row].float().cpu()
    return torch.stack(out)


def feature_size(base: LoadedModel, spec: FeatureSpec) -> int:
    return int(base_identity(base)["hidden_size"]) * len(spec.depths) * len(spec.pooling)


class _Enough(Exception):
    """Raised by a block hook once the deepest hidden state wanted is in hand."""


_capturing = threading.local()


def _hidden_states(
    model: Any, n_layers: int, layers: Sequence[int], ids: Any, attention: Any
) -> dict[int, Any]:
    """`hidden_states[i]` for each i in `layers`. When the last layer is not among them
    and the model's blocks can be found, hooks on the blocks take their outputs and
    stop the forward pass after the deepest (only on this thread: another thread's
    forward through the same modules is left alone)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    extra: dict[str, Any] = {}
    if hasattr(model, "peft_config"):
        extra["adapter_names"] = ["__base__"] * ids.shape[0]
    blocks = _blocks(inner, n_layers)
    deepest = max(layers)
    # peft removes its per-call adapter hooks only when the forward pass returns: one
    # stopped by an exception would leave them on every later call. A peft model runs
    # whole.
    if deepest == n_layers or blocks is None or extra:
        if "logits_to_keep" in inspect.signature(inner.forward).parameters:
            extra["logits_to_keep"] = 1  # the head reads hidden states, not logits
        result = model(
            input_ids=ids,
            attention_mask=attention,
            output_hidden_states=True,
            use_cache=False,
            **extra,
        )
        return {i: result.hidden_states[i] for i in layers}
    captured: dict[int, Any] = {}
    token = object()

    def hook_for(index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if getattr(_capturing, "token", None) is not token:
                return
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == deepest:
                raise _Enough

        return hook

    handles = [blocks[i - 1].register_forward_hook(hook_for(i)) for i in set(layers)]
    _capturing.token = token
    try:
        model(input_ids=ids, attention_mask=attention, use_cache=False, **extra)
    except _Enough:
        pass
    finally:
        _capturing.token = None
        for handle in handles:
            handle.remove()
    return captured


def _blocks(model: Any, n_layers: int) -> Any:
    """The model's list of transformer blocks (None: not found)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    return None


def _pool(hidden_states: Sequence[Any], spec: FeatureSpec, inside: Any) -> Any:
    import torch

    mask = inside.unsqueeze(-1)
    count = inside.sum(1, keepdim=True).clamp(min=1)
    last = inside.long().cumsum(1).argmax(1)  # the last continuation token of each row
    parts = []
    for h in hidden_states:
        h = h.float()
        for kind in spec.pooling:
            if kind == "mean":
                parts.append((h * mask).sum(1) / count)
            elif kind == "max":
                parts.append(h.masked_fill(~mask, -torch.inf).amax(1))
            else:
                parts.append(h[torch.arange(h.shape[0], device=h.device), last])
    return torch.cat(parts, dim=-1)


# -- the head ------------------------------------------------------------------------


@dataclass
class Head:
    """score = weight · (features - mean) / scale + bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.mean.dtype) - self.mean) / self.scale
        return x @ self.weight + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.weight.contiguous(),
            "bias": self.bias.reshape(1).contiguous(),
            "mean": self.mean.contiguous(),
            "scale": self.scale.contiguous(),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Head:
        return cls(t["weight"], t["bias"].reshape(()), t["mean"], t["scale"])


def fit_head(
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    l2: float,
    max_steps: int = 200,
) -> tuple[Head, dict[str, Any]]:
    """Fit a linear head: `pairs` is (chosen features, rejected features, weights),
    `labels` is (features, +1/-1, weights). Bradley-Terry on the pairs, logistic on the
    labels (summed, weighted), plus l2/2 · |weight|²; the bias is not penalised and only
    labels inform it (a pair says nothing about where zero is)."""
    import torch

    rows = [t for part in (pairs, labels) if part is not None for t in part[:-1] if t.ndim == 2]
    if not rows:
        raise ValueError("nothing to fit a reward head on")
    everything = torch.cat(rows).double()
    mean = everything.mean(0)
    scale = everything.std(0, unbiased=False).clamp(min=1e-6)
    dim = everything.shape[1]
    weight = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def standard(x: torch.Tensor) -> torch.Tensor:
        return (x.double() - mean) / scale

    pc = pr = pw = lx = ly = lw = None
    if pairs is not None and len(pairs[0]):
        pc, pr, pw = standard(pairs[0]), standard(pairs[1]), pairs[2].double()
    if labels is not None and len(labels[0]):
        lx, ly, lw = standard(labels[0]), labels[1].double(), labels[2].double()
    params = [weight, bias] if lx is not None else [weight]
    optimizer = torch.optim.LBFGS(
        params, lr=1, max_iter=max_steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def loss_fn() -> torch.Tensor:
        loss = 0.5 * l2 * weight.dot(weight)
        if pc is not None and pr is not None and pw is not None:
            loss = loss + (pw * torch.nn.functional.softplus(-(pc - pr) @ weight)).sum()
        if lx is not None and ly is not None and lw is not None:
            loss = loss + (lw * torch.nn.functional.softplus(-ly * (lx @ weight + bias))).sum()
        return loss

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        final = float(loss_fn())
    steps = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    head = Head(weight.detach().float(), bias.detach().float(), mean.float(), scale.float())
    return head, {"loss": final, "steps": steps}


# -- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class RewardConfig:
    features: FeatureSpec = field(default_factory=FeatureSpec)
    l2: float = 10.0
    """L2 penalty on the head's weights (the features are standardised)."""
    max_steps: int = 200
    """L-BFGS iterations at most."""
    label_weight_cap: float = 2.0
    """A labelled example weighs its net score's size, at most this much."""
    min_train: int = 8
    """Fewer training examples (pairs and labels) than this and no reward model is
    trained."""
    min_heldout: int = 8
    """Fewer held-out examples than this and none is trained: it could not be judged."""
    max_train: int = 2000
    """At most this many training pairs and as many labels (the newest)."""
    max_heldout: int = 400
    significance: float = 0.05
    """The gate: a reward model is promoted only when its held-out ranking accuracy is
    above chance at this level (one-sided permutation test)."""
    permutations: int = 4000
    cross_validate_below: int = 100
    """While people's held-out feedback holds fewer examples than this, a reward model
    is judged by cross-validation over all of people's feedback (`folds` folds, by
    story: each fold's stories are scored by a head trained on the other folds'), and
    the one registered is trained on all of it. A server's first reactions hold too few
    held-out examples to judge anything (50 reactions: about 10, one of them 👍 for a
    rare taste); cross-validation judges on all 50 and trains on all 50."""
    folds: int = 5
    min_cross_validated: int = 32
    """Fewer examples than this in all and a reward model is judged on the held-out side
    (or not trained): folds of a handful of examples decide nothing."""
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError("folds must be at least 2")
        if self.l2 <= 0:
            raise ValueError("l2 must be positive")
        if self.min_train < 1 or self.min_heldout < 1:
            raise ValueError("min_train and min_heldout must be at least 1")
        if not 0 < self.significance < 1:
            raise ValueError("significance must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_split(
    data: FeedbackDatasets, config: RewardConfig
) -> tuple[list[PreferencePair], list[LabelledExample]]:
    """What a reward model trains on: the training side's pairs and labels (the newest
    `max_train` of each), people's only (pairs a reward model made would teach it its
    own mistakes)."""
    return _newest(data, config, split="train")


def _newest(
    data: FeedbackDatasets, config: RewardConfig, split: str | None = None
) -> tuple[list[PreferencePair], list[LabelledExample]]:
    """People's pairs and labels of `split` (None: both sides), the newest `max_train`
    of each."""
    pairs = [p for p in data.pairs if p.source != "reward" and split in (None, p.split)]
    labels = [e for e in data.examples if split in (None, e.split)]
    pairs.sort(key=lambda p: max(p.chosen_generation_id, p.rejected_generation_id))
    labels.sort(key=lambda e: e.generation_id)
    return pairs[-config.max_train :], labels[-config.max_train :]


def heldout_split(
    data: FeedbackDatasets, config: RewardConfig
) -> tuple[list[PreferencePair], list[LabelledExample]]:
    """What judges it: people's held-out pairs and labels."""
    pairs = [p for p in data.pairs if p.split == "heldout" and p.source != "reward"]
    labels = [e for e in data.examples if e.split == "heldout"]
    return pairs[: config.max_heldout], labels[: config.max_heldout]


def people_feedback(
    data: FeedbackDatasets, config: RewardConfig
) -> tuple[list[PreferencePair], list[LabelledExample]]:
    """All of people's pairs and labels, both sides of the split (the newest
    `max_train` of each): what cross-validation judges and trains on."""
    return _newest(data, config)


def cross_validated(config: RewardConfig, data: FeedbackDatasets) -> bool:
    """Whether a reward model on `data` is judged by cross-validation: too little is
    held out to judge it otherwise, and there is enough to deal into folds."""
    held = sum(len(part) for part in heldout_split(data, config))
    everything = sum(len(part) for part in people_feedback(data, config))
    return held < config.cross_validate_below and everything >= config.min_cross_validated


def reward_skip_reason(config: RewardConfig, data: FeedbackDatasets) -> str | None:
    """Why no reward model can be trained and judged on this feedback, as a sentence for
    a person; None when one can. Known before any model loads."""
    folds = cross_validated(config, data)
    # By cross-validation, every example trains the model kept (and judges it).
    pairs, labels = people_feedback(data, config) if folds else training_split(data, config)
    held = sum(len(part) for part in heldout_split(data, config))
    n = len(pairs) + len(labels)
    if n < config.min_train:
        return (
            f"not enough feedback yet: {n} training examples (a reward model needs"
            f" {config.min_train}), {held} held out"
        )
    liked = sum(e.label for e in labels)
    if not pairs and liked in (0, len(labels)):
        side = "liked (👍)" if liked else "disliked (👎)"
        return f"all {n} rated continuations are {side}: nothing tells good from bad yet"
    if folds:
        stories = {p.story_id for p in pairs} | {e.story_id for e in labels}
        if len(stories) < config.folds:
            return (
                f"too little feedback to judge one: {len(stories)} stories rated (a reward"
                f" model is judged on {config.folds} folds of stories)"
            )
        return None
    if held < config.min_heldout:
        return (
            f"too little held-out feedback to judge one: {held} held-out examples (a reward"
            f" model needs {config.min_heldout})"
        )
    return None


# -- the model -----------------------------------------------------------------------


class RewardModel:
    """A trained head on a base model's features: `score(prompts, continuations)`."""

    def __init__(
        self, base: LoadedModel, head: Head, spec: FeatureSpec, info: dict[str, Any]
    ) -> None:
        self.base = base
        self.head = head
        self.spec = spec
        self.info = info
        """The base model's identity, the training config and figures."""
        stories = info.get("stories")
        self._stories = None if stories is None else frozenset(stories)

    @classmethod
    def train(
        cls,
        base: LoadedModel,
        data: FeedbackDatasets,
        config: RewardConfig | None = None,
        *,
        memo: FeatureMemo | None = None,
    ) -> RewardModel:
        """Train on the training side of `data` (blocking: run it in a worker thread)."""
        config = config or RewardConfig()
        pairs, labels = training_split(data, config)
        return cls.fit(base, pairs, labels, config, memo=memo)

    @classmethod
    def fit(
        cls,
        base: LoadedModel,
        pairs: Sequence[PreferencePair],
        labels: Sequence[LabelledExample],
        config: RewardConfig,
        *,
        features: Features | None = None,
        memo: FeatureMemo | None = None,
    ) -> RewardModel:
        """Train on these pairs and labels (blocking). `features`: already computed;
        else computed, with those in `memo` taken from there (`Features.of`)."""
        if not pairs and not labels:
            raise ValueError("nothing to train a reward model on")
        features = features or Features.of(base, config, pairs, labels, memo)
        started = time.perf_counter()  # the features' time is their own
        head, fit = fit_head(
            *features.training_data(pairs, labels, config), l2=config.l2, max_steps=config.max_steps
        )
        info: dict[str, Any] = {
            "format": FORMAT,
            "base": base_identity(base),
            "features": asdict(config.features),
            "config": config.to_dict(),
            "stories": sorted({p.story_id for p in pairs} | {e.story_id for e in labels}),
            "train": {
                "pairs": len(pairs),
                "labels": len(labels),
                "liked": sum(e.label for e in labels),
                "seconds": time.perf_counter() - started + features.seconds,
                "feature_seconds": features.seconds,
                **fit,
            },
        }
        # As `reward.json` will hold it (lists, not tuples), so a loaded model's equals.
        return cls(base, head, config.features, json.loads(json.dumps(info)))

    def trained_on(self, story_id: int) -> bool:
        """Whether this model learned from the story's feedback. A model saved before
        the stories were recorded trained on the training side of the split only."""
        if self._stories is None:
            from .datasets import DatasetConfig, story_split

            return story_split(story_id, DatasetConfig()) == "train"
        return story_id in self._stories

    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        *,
        batch_size: int = 16,
        memo: FeatureMemo | None = None,
    ) -> list[float]:
        """The reward of each continuation after its prompt (higher: more liked). Batched,
        in inference mode, on the base model's device, without its LoRA adapters; call
        it where a forward pass may run (a serving thread, a worker). `memo`: features
        computed before on this base model with this model's `spec`, taken from there;
        those computed here are added to it (several heads ranking the same texts)."""
        import torch

        if not prompts:
            return []
        if memo is None:
            features = continuation_features(
                self.base, self.spec, prompts, continuations, batch_size=batch_size
            )
        else:
            keys = list(zip(prompts, continuations, strict=True))
            remember_features(self.base, self.spec, keys, memo, batch_size)
            features = torch.stack([memo[k] for k in keys])
        return [float(v) for v in self.head(features)]

    def evaluate(
        self,
        pairs: Sequence[PreferencePair],
        labels: Sequence[LabelledExample],
        config: RewardConfig | None = None,
    ) -> HeldoutReport:
        """Held-out figures and the significance test (see `heldout_report`)."""
        config = config or RewardConfig()
        scores = scores_by_text(self.scores_of(pairs, labels, config))
        return scored_report(pairs, labels, scores, config)

    def scores_of(
        self,
        pairs: Sequence[PreferencePair],
        labels: Sequence[LabelledExample],
        config: RewardConfig,
    ) -> dict[tuple[str, str], float]:
        """The score of every (prompt, continuation) in these pairs and labels."""
        texts = _texts(pairs, labels)
        scores = self.score(
            [t[0] for t in texts], [t[1] for t in texts], batch_size=config.batch_size
        )
        return dict(zip(texts, scores, strict=True))

    def save(self, directory: Path | str) -> None:
        """Write `head.safetensors` (the head, a few kilobytes) and `reward.json` (the
        feature spec, the base model's identity, the training config and figures)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.head.tensors(), str(directory / HEAD_FILE))
        (directory / SPEC_FILE).write_text(
            json.dumps(self.info, indent=2, default=str), encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: Path | str, base: LoadedModel) -> RewardModel:
        """Load a saved reward model onto `base`, which must be the base model it was
        trained on (`RewardModelMismatch` otherwise)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            info = json.loads((directory / SPEC_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(directory / HEAD_FILE))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"No readable reward model in {directory}: {exc}") from None
        trained_on, here = info.get("base", {}), base_identity(base)
        if trained_on != here:
            raise RewardModelMismatch(
                f"The reward model in {directory} was trained on the base model"
                f" {_describe(trained_on)}, not on {_describe(here)}: its head reads that"
                " model's hidden states. Serve the base model it was trained on, or train"
                " a new reward model on this one."
            )
        spec = FeatureSpec.from_dict(info["features"])
        head = Head.from_tensors(tensors)
        if head.weight.shape[0] != feature_size(base, spec):
            raise RewardModelMismatch(
                f"The reward model in {directory} does not fit {_describe(here)}: its head"
                f" reads {head.weight.shape[0]} features, the model gives"
                f" {feature_size(base, spec)}."
            )
        return cls(base, head, spec, info)


def _describe(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('model_id')} ({identity.get('model_type')}, width"
        f" {identity.get('hidden_size')}, {identity.get('layers')} layers)"
    )


def _texts(
    pairs: Sequence[PreferencePair], labels: Sequence[LabelledExample]
) -> list[tuple[str, str]]:
    """Every (prompt, continuation) of these pairs and labels, once each, in order."""
    return list(
        dict.fromkeys(
            [(p.prompt, p.chosen) for p in pairs]
            + [(p.prompt, p.rejected) for p in pairs]
            + [(e.prompt, e.completion) for e in labels]
        )
    )


FeatureMemo = dict[tuple[str, str], "torch.Tensor"]
"""The base model's features of (prompt, continuation)s, for one model and one
`FeatureSpec`: a round's reward model and its judge (`rounds`) read the same feedback,
and a forward pass each is most of their cost."""


def remember_features(
    base: LoadedModel,
    spec: FeatureSpec,
    keys: Sequence[tuple[str, str]],
    memo: FeatureMemo,
    batch_size: int = 16,
) -> None:
    """Compute the features of the (prompt, continuation)s in `keys` that `memo` lacks
    (each once) and add them to it."""
    missing = [k for k in dict.fromkeys(keys) if k not in memo]
    if missing:
        table = continuation_features(
            base, spec, [k[0] for k in missing], [k[1] for k in missing], batch_size=batch_size
        )
        memo.update(zip(missing, table, strict=True))


@dataclass
class Features:
    """The base model's features of every continuation in some feedback, computed once
    (a forward pass each), for as many heads as are fitted on them."""

    rows: dict[tuple[str, str], int]
    table: torch.Tensor
    seconds: float

    @classmethod
    def of(
        cls,
        base: LoadedModel,
        config: RewardConfig,
        pairs: Sequence[PreferencePair],
        labels: Sequence[LabelledExample],
        memo: FeatureMemo | None = None,
    ) -> Features:
        """`memo`: features computed before (same base model, `config.features`),
        taken from there; those computed here are added to it."""
        import torch

        started = time.perf_counter()
        texts = _texts(pairs, labels)
        memo = memo if memo is not None else {}
        if not texts:
            table = continuation_features(base, config.features, [], [])
            return cls({}, table, time.perf_counter() - started)
        remember_features(base, config.features, texts, memo, config.batch_size)
        table = torch.stack([memo[t] for t in texts])
        return cls({t: i for i, t in enumerate(texts)}, table, time.perf_counter() - started)

    def __call__(self, keys: Sequence[tuple[str, str]]) -> torch.Tensor:
        return self.table[[self.rows[k] for k in keys]]

    def training_data(
        self,
        pairs: Sequence[PreferencePair],
        labels: Sequence[LabelledExample],
        config: RewardConfig,
    ) -> tuple[Any, Any]:
        """`fit_head`'s (pairs, labels) arguments."""
        import torch

        pair_data = label_data = None
        if pairs:
            pair_data = (
                self([(p.prompt, p.chosen) for p in pairs]),
                self([(p.prompt, p.rejected) for p in pairs]),
                torch.tensor([p.weight for p in pairs]),
            )
        if labels:
            label_data = (
                self([(e.prompt, e.completion) for e in labels]),
                torch.tensor([1.0 if e.label else -1.0 for e in labels]),
                torch.tensor([min(abs(e.score), config.label_weight_cap) for e in labels]),
            )
        return pair_data, label_data


def cross_validate(
    base: LoadedModel,
    pairs: Sequence[PreferencePair],
    labels: Sequence[LabelledExample],
    config: RewardConfig,
    memo: FeatureMemo | None = None,
) -> tuple[RewardModel, Scores]:
    """A reward model trained on all these pairs and labels, and every example's
    out-of-fold scores: the stories are dealt into `config.folds` folds (`deal_folds`),
    and each fold's continuations are scored by a head trained on the other folds'
    feedback, so no score comes from a head that saw its story (nor the same text in
    it: scores are kept per fold). The features are computed once for all the folds
    (blocking: run it in a worker thread); `memo` as `Features.of` takes it."""
    features = Features.of(base, config, pairs, labels, memo)
    fold = deal_folds(pairs, labels, config)
    by_fold: dict[tuple[int, tuple[str, str]], float] = {}
    for k in range(config.folds):
        train_pairs = [p for p in pairs if fold[p.story_id] != k]
        train_labels = [e for e in labels if fold[e.story_id] != k]
        if not train_pairs and not train_labels:
            continue
        head, _ = fit_head(
            *features.training_data(train_pairs, train_labels, config),
            l2=config.l2,
            max_steps=config.max_steps,
        )
        held = _texts(
            [p for p in pairs if fold[p.story_id] == k],
            [e for e in labels if fold[e.story_id] == k],
        )
        if held:
            # Without the head's bias: it follows its training folds' share of 👍, so
            # a fold scored by a head that saw fewer of them would rank lower as a whole.
            values = (float(v) - float(head.bias) for v in head(features(held)))
            by_fold.update(((k, text), v) for text, v in zip(held, values, strict=True))
    model = RewardModel.fit(base, pairs, labels, config, features=features)
    return model, lambda story, text: by_fold.get((fold[story], text))


Scores = Callable[[int, tuple[str, str]], "float | None"]
"""A continuation's score in a story (story id, (prompt, continuation)), None if it has
none: out-of-fold scores depend on the story's fold."""


def scores_by_text(scores: dict[tuple[str, str], float]) -> Scores:
    """`Scores` from one model's scores of each text, whatever the story."""
    return lambda story, text: scores.get(text)


def deal_folds(
    pairs: Sequence[PreferencePair], labels: Sequence[LabelledExample], config: RewardConfig
) -> dict[int, int]:
    """Each story's fold: stories whose labels are mostly 👍, mostly 👎, and the rest
    are each shuffled (seeded) and dealt in turn, so that every fold holds about the
    same share of each (a rare taste's few 👍 are not all in one fold)."""
    import random

    net: dict[int, float] = {p.story_id: 0.0 for p in pairs}
    for e in labels:
        net[e.story_id] = net.get(e.story_id, 0.0) + (1.0 if e.label else -1.0)
    rng = random.Random(config.seed)
    fold: dict[int, int] = {}
    dealt = 0
    for kind in (1, -1, 0):
        stories = sorted(s for s, v in net.items() if (v > 0) - (v < 0) == kind)
        rng.shuffle(stories)
        for story in stories:
            fold[story] = dealt % config.folds
            dealt += 1
    return fold


def scored_report(
    pairs: Sequence[PreferencePair],
    labels: Sequence[LabelledExample],
    scores: Scores,
    config: RewardConfig,
) -> HeldoutReport:
    """`heldout_report` for scores already known; examples with a continuation that
    has none are left out."""
    margins, judged_pairs = [], []
    for p in pairs:
        chosen = scores(p.story_id, (p.prompt, p.chosen))
        rejected = scores(p.story_id, (p.prompt, p.rejected))
        if chosen is not None and rejected is not None:
            judged_pairs.append(p)
            margins.append(chosen - rejected)
    values, judged_labels = [], []
    for e in labels:
        value = scores(e.story_id, (e.prompt, e.completion))
        if value is not None:
            judged_labels.append(e)
            values.append(value)
    return heldout_report(
        judged_pairs,
        margins,
        judged_labels,
        values,
        permutations=config.permutations,
        seed=config.seed,
    )


# -- held-out judgement --------------------------------------------------------------


@dataclass(frozen=True)
class HeldoutReport:
    """How well a reward model ranks held-out feedback.

    `accuracy` is the statistic the gate tests: the mean of the pair accuracy (chosen
    scored above rejected, ties half) over the pairs it judges and the AUC of the labels
    (a liked continuation scored above a disliked one, over every such combination;
    ties half), each counted when present and weighted by the evidence it holds
    (`evaluation.evidence`: one pair cannot outweigh forty labels). Both are 0.5 for a
    scorer that knows nothing, whatever share of the reactions is 👍, and neither
    depends on where the head puts zero. A held-out pair whose two continuations are
    both held-out labels repeats a comparison the AUC already makes and is left out of
    the test (but not of `pair_accuracy`). `p_value`: the chance that a scorer that
    knows nothing scores at least `accuracy` (permutation test: each judged pair's
    order flipped at random, the labels shuffled), one-sided."""

    accuracy: float
    p_value: float
    pairs: int
    pair_accuracy: float | None
    labels: int
    label_accuracy: float | None
    """Share of labels on the right side of zero (ties half)."""
    label_auc: float | None
    judged_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"held-out accuracy {self.accuracy:.2f} (p = {self.p_value:.3f})"]
        if self.pairs:
            parts.append(f"pairs {self.pair_accuracy:.2f} on {self.pairs}")
        if self.labels:
            auc = f", AUC {self.label_auc:.2f}" if self.label_auc is not None else ""
            parts.append(f"labels {self.label_accuracy:.2f}{auc} on {self.labels}")
        return ", ".join(parts)


def _right(value: float) -> float:
    return 1.0 if value > 0 else 0.5 if value == 0 else 0.0


def heldout_report(
    pairs: Sequence[PreferencePair],
    margins: Sequence[float],
    labels: Sequence[LabelledExample],
    scores: Sequence[float],
    *,
    permutations: int = 4000,
    seed: int = 0,
) -> HeldoutReport:
    """Figures for scores already computed: `margins[i]` is score(chosen) -
    score(rejected) of `pairs[i]`, `scores[j]` the score of `labels[j]`."""
    import torch

    labelled = {e.generation_id for e in labels}
    judged = [
        m
        for p, m in zip(pairs, margins, strict=True)
        if not (p.chosen_generation_id in labelled and p.rejected_generation_id in labelled)
    ]
    liked = torch.tensor([e.label for e in labels], dtype=torch.bool)
    ranks = torch.tensor(average_ranks(list(scores)), dtype=torch.float64)
    n_pos, n_neg = int(liked.sum()), len(labels) - int(liked.sum())
    generator = torch.Generator().manual_seed(seed)

    def auc(positive_rank_sums: torch.Tensor) -> torch.Tensor:
        return (positive_rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

    parts, null, weights = [], [], []
    if judged:
        right = torch.tensor([_right(m) for m in judged], dtype=torch.float64)
        parts.append(right.mean())
        decided = torch.tensor([m != 0 for m in judged])
        coin = torch.randint(0, 2, (permutations, len(judged)), generator=generator)
        null.append(torch.where(decided, coin.double(), 0.5).mean(1))
        weights.append(evidence(len(judged)))
    if n_pos and n_neg:
        parts.append(auc(ranks[liked].sum()))
        shuffled = torch.rand((permutations, len(labels)), generator=generator).argsort(1)
        null.append(auc(ranks[shuffled[:, :n_pos]].sum(1)))
        weights.append(evidence(n_pos, n_neg))
    if parts:
        share = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        statistic = float((torch.stack(parts).double() * share).sum())
        spread = (torch.stack(null).double() * share[:, None]).sum(0)
        p_value = (1 + int((spread >= statistic - 1e-12).sum())) / (permutations + 1)
    else:
        statistic, p_value = 0.5, 1.0
    return HeldoutReport(
        accuracy=statistic,
        p_value=p_value,
        pairs=len(pairs),
        pair_accuracy=sum(map(_right, margins)) / len(pairs) if pairs else None,
        labels=len(labels),
        label_accuracy=(
            sum(_right(s if e.label else -s) for e, s in zip(labels, scores, strict=True))
            / len(labels)
            if labels
            else None
        ),
        label_auc=float(auc(ranks[liked].sum())) if n_pos and n_neg else None,
        judged_pairs=len(judged),
    )


def gate(
    config: RewardConfig,
    report: HeldoutReport,
    current: HeldoutReport | None = None,
    current_name: str = "the promoted reward model",
    mine: HeldoutReport | None = None,
) -> list[str]:
    """Why a new reward model may not be promoted (empty: it may). It must rank
    held-out feedback better than chance with confidence (`significance`), and at least
    as well as the promoted one on the same examples: `current` is the promoted one's
    report and `mine` the new one's (default `report`) on the examples neither learned
    from."""
    mine = mine or report
    reasons = []
    if report.p_value >= config.significance:
        reasons.append(
            f"held-out accuracy {report.accuracy:.2f} is not clearly above chance"
            f" (p = {report.p_value:.2f}, needs below {config.significance:g})"
        )
    if current is not None and mine.accuracy < current.accuracy:
        reasons.append(
            f"held-out accuracy {mine.accuracy:.2f} is below {current_name}'s"
            f" {current.accuracy:.2f} on the same {current.pairs + current.labels} examples"
        )
    return reasons


# -- the registry --------------------------------------------------------------------


RewardStatus = Literal["candidate", "promoted", "rejected", "retired"]

TEMPORARY = ".writing-"
"""The prefix of a version directory being written (deleted by the next sweep)."""


def reward_dir(settings: Settings) -> Path:
    """Where reward model versions live: beside the adapter directory, named after it
    (`adapters` → `adapters-rewards`), so two deployments never share one."""
    root = settings.adapter_dir.absolute()
    return root.parent / f"{root.name}-rewards"


@dataclass(frozen=True)
class RewardVersion:
    version: int
    community: str | None
    """None: the shared reward model."""
    path: Path
    status: RewardStatus
    metrics: dict[str, Any]
    data_counts: dict[str, Any]
    created_at: str
    promoted_at: str | None

    @property
    def name(self) -> str:
        return f"r{self.version}"

    def summary(self) -> str:
        """One line: version, lineage, status, date and the held-out figures."""
        m = self.metrics
        parts = [self.name, self.community or "shared", self.status, self.created_at[:16]]
        if "accuracy" in m:
            parts.append(f"held-out accuracy {m['accuracy']:.2f} (p = {m['p_value']:.3f})")
            if m.get("current_accuracy") is not None:
                parts.append(f"promoted one {m['current_accuracy']:.2f}")
        if "train" in m:
            parts.append(f"{m['train']['pairs']} pairs, {m['train']['labels']} labels")
        if m.get("reasons"):
            parts.append("gate: " + "; ".join(m["reasons"]))
        return " · ".join(parts)


def _reward_version(row: dict[str, Any]) -> RewardVersion:
    return RewardVersion(
        version=row["version"],
        community=row["community"],
        path=Path(row["path"]),
        status=row["status"],
        metrics=row["metrics"],
        data_counts=row["data_counts"],
        created_at=row["created_at"],
        promoted_at=row["promoted_at"],
    )


class RewardRegistry:
    """Reward model versions: directories `v0001/`, ... under `root`, rows in
    `reward_models`; at most one promoted per lineage (a community, or None for the
    shared one).

    Written as the adapter registry writes adapters: files into a temporary directory
    renamed into place, then the row, then (one transaction) the promotion; opening the
    registry holding the round lock (of `lock_dir`, the adapter directory: rounds write
    both) deletes temporary directories and moves version directories without a row to
    `orphaned/`; a new version's number is past every row and every directory."""

    def __init__(
        self, store: RewardModelRecords, root: Path, *, lock_dir: Path | None = None
    ) -> None:
        self.store = store
        self.root = Path(root)
        self.lock_dir = Path(lock_dir) if lock_dir is not None else self.root

    async def open(self, *, locked: bool = False) -> RewardRegistry:
        """Sweep what a killed round left (`locked`: the caller holds the round lock;
        else the sweep takes it, and is skipped while a round runs)."""
        from ..errors import TrainingBusy
        from .registry import round_lock

        if locked:
            await self._sweep()
        elif self.root.is_dir():
            try:
                with round_lock(self.lock_dir):
                    await self._sweep()
            except TrainingBusy:
                pass
        return self

    async def _sweep(self) -> None:
        from .registry import sweep_directory

        if not self.root.is_dir():
            return
        known = {v.version for v in await self.list()}

        def sweep() -> list[Path]:
            for leftover in self.root.glob(TEMPORARY + "*"):
                shutil.rmtree(leftover, ignore_errors=True)
            return sweep_directory(self.root, known)

        for path in await asyncio.to_thread(sweep):
            log.warning("reward model directory without a registry row moved to %s", path)

    async def register(
        self,
        save: Callable[[Path], None],
        *,
        community: str | None = None,
        metrics: dict[str, Any] | None = None,
        data_counts: dict[str, Any] | None = None,
    ) -> RewardVersion:
        """A new candidate: `save(directory)` writes the model's files (in a worker
        thread), e.g. `RewardModel.save`."""
        from .registry import newest_on_disk

        newest = await asyncio.to_thread(newest_on_disk, self.root)
        version = max(await self.store.newest_reward_model_version(), newest) + 1
        final = self.root / f"v{version:04d}"

        def write() -> None:
            tmp = self.root / f"{TEMPORARY}v{version:04d}-{uuid.uuid4().hex}"
            tmp.mkdir(parents=True)
            try:
                save(tmp)
                if not (tmp / SPEC_FILE).is_file() or not (tmp / HEAD_FILE).is_file():
                    raise RuntimeError("the reward model was not saved")
                os.replace(tmp, final)  # atomic on one filesystem
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

        await asyncio.to_thread(write)
        await self.store.add_reward_model(
            version,
            str(final),
            community=community,
            metrics=json.loads(json.dumps(metrics or {}, default=str)),
            data_counts=data_counts or {},
        )
        found = await self.get(version)
        assert found is not None
        return found

    async def get(self, version: int) -> RewardVersion | None:
        row = await self.store.reward_model(version)
        return _reward_version(row) if row else None

    async def list(self) -> list[RewardVersion]:
        return [_reward_version(r) for r in await self.store.reward_models()]

    async def promoted(self, community: str | None = None) -> RewardVersion | None:
        row = await self.store.promoted_reward_model(community)
        return _reward_version(row) if row else None

    async def serving(self, community: str | None) -> RewardVersion | None:
        """The reward model a community's stories are ranked by: its own, else the
        shared one (None: neither is promoted)."""
        return (await self.promoted(community) if community else None) or await self.promoted()

    async def serving_name(self, community: str | None) -> str | None:
        """The name of `serving`'s reward model, or None."""
        found = await self.serving(community)
        return found.name if found else None

    async def promote(self, version: int) -> RewardVersion:
        """Use `version` from now on in its lineage; the one used before is retired."""
        target = await self.get(version)
        if target is None:
            raise InvalidInput(f"There is no reward model version {version}.")
        if not (target.path / HEAD_FILE).is_file():
            raise InvalidInput(
                f"Reward model version {version} is missing on disk ({target.path})."
            )
        await self.store.promote_reward_model(version)
        promoted = await self.get(version)
        assert promoted is not None
        return promoted

    async def reject(self, version: int) -> None:
        await self.store.reject_reward_model(version)

    async def rollback(self, community: str | None = None) -> RewardVersion | None:
        """Reject the lineage's promoted version and use the one promoted before it, or
        none. Returns the one promoted now."""
        if await self.promoted(community) is None:
            raise InvalidInput(
                f"No reward model is promoted for {community or 'the shared lineage'}."
            )
        now = await self.store.rollback_reward_model(community)
        return await self.get(now) if now is not None else None

    def load(self, version: RewardVersion, base: LoadedModel) -> RewardModel:
        return RewardModel.load(version.path, base)


# -- a round's reward model ----------------------------------------------------------


async def train_reward_model(
    registry: RewardRegistry,
    base: LoadedModel,
    data: FeedbackDatasets,
    config: RewardConfig,
    *,
    community: str | None = None,
    memo: FeatureMemo | None = None,
) -> dict[str, Any]:
    """Train a reward model on `data`, judge it on the held-out side (by
    cross-validation while little is held out: `cross_validated`), register it and
    promote or reject it. Returns the figures for the round's report: `status`
    (promoted, rejected or skipped), `reason`, and for a trained one its version, the
    `HeldoutReport`'s figures, the promoted one's accuracy on the same examples and the
    training figures. `memo`: the base model's features, shared with what else the
    round fits on this feedback (`Features.of`)."""
    reason = reward_skip_reason(config, data)
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    judged_by = "cross-validation" if cross_validated(config, data) else "held-out"
    if judged_by == "cross-validation":
        pairs, labels = people_feedback(data, config)
        model, scores = await asyncio.to_thread(cross_validate, base, pairs, labels, config, memo)
    else:
        model = await asyncio.to_thread(RewardModel.train, base, data, config, memo=memo)
        pairs, labels = heldout_split(data, config)
        scores = scores_by_text(await asyncio.to_thread(model.scores_of, pairs, labels, config))
    report = scored_report(pairs, labels, scores, config)
    current, current_report, mine, note = await registry.promoted(community), None, None, None
    if current is not None:
        try:
            previous = await asyncio.to_thread(registry.load, current, base)
        except ConfigError as exc:  # gone, or made for another base model: not a rival
            note = f"{current.name} not compared: {exc}"
            log.warning("reward model %s", note)
        else:
            # Compared where neither learned: the new one's scores there are held out
            # (or out of fold), and so must the promoted one's be.
            fresh_pairs = [p for p in pairs if not previous.trained_on(p.story_id)]
            fresh_labels = [e for e in labels if not previous.trained_on(e.story_id)]
            if len(fresh_pairs) + len(fresh_labels) >= config.min_heldout:
                theirs = await asyncio.to_thread(
                    previous.scores_of, fresh_pairs, fresh_labels, config
                )
                current_report = scored_report(
                    fresh_pairs, fresh_labels, scores_by_text(theirs), config
                )
                mine = scored_report(fresh_pairs, fresh_labels, scores, config)
            else:
                note = (
                    f"{current.name} not compared: it learned from all but"
                    f" {len(fresh_pairs) + len(fresh_labels)} of these examples"
                )
    reasons = gate(config, report, current_report, current.name if current else "", mine)
    metrics: dict[str, Any] = {
        **report.to_dict(),
        "judged_by": judged_by,
        "current_version": current.version if current else None,
        "current_accuracy": current_report.accuracy if current_report else None,
        "passed": not reasons,
        "reasons": reasons,
        "train": model.info["train"],
    }
    if note:
        metrics["note"] = note
    counts = {
        "train_pairs": model.info["train"]["pairs"],
        "train_labels": model.info["train"]["labels"],
        "heldout_pairs": len(pairs),
        "heldout_labels": len(labels),
        "judged_by": judged_by,
    }
    version = await registry.register(
        model.save, community=community, metrics=metrics, data_counts=counts
    )
    if reasons:
        await registry.reject(version.version)
        status = "rejected"
    else:
        await registry.promote(version.version)
        status = "promoted"
    return {"status": status, "reason": "; ".join(reasons), "version": version.version, **metrics}


def reward_summary(result: dict[str, Any]) -> str:
    """The round's line about its reward model."""
    if result["status"] == "skipped":
        return f"reward model skipped: {result['reason']}"
    report = HeldoutReport(**{k: result[k] for k in HeldoutReport.__dataclass_fields__})
    train = result["train"]
    folds = " (cross-validated)" if result.get("judged_by") == "cross-validation" else ""
    line = (
        f"reward model r{result['version']} {result['status']}: {report.summary()}{folds};"
        f" trained on {train['pairs']} pairs and {train['labels']} labels"
        f" in {train['seconds']:.1f} s"
    )
    if result["reason"]:
        line += f" ({result['reason']})"
    return line
