"""One round of preference fine-tuning of the LoRA adapter, with TRL.

The policy is the base model with the adapter being served (the promoted one), loaded
as the trainable "default" adapter, or a fresh LoRA. The reference is chosen on purpose:
TRL's DPO and KTO trainers, given a peft model that already has an adapter, copy it into
a frozen "ref" adapter and score against that, so each round is anchored to the last
good adapter rather than drifting from the bare base model. (With a fresh LoRA, whose
B matrices start at zero, that copy *is* the base model.) The "ref" copy stays on the
model after training; it is deleted before saving.

Settings that TRL's defaults get wrong for small LoRA runs are set explicitly: the
learning rate (TRL's 1e-6 is useless for LoRA), gradient checkpointing and bf16 (off on
the CPU), the example order (KTO reads its dataset in order, so it is shuffled here), and
the tokenizer (passed in, or TRL tries to load a processor by the model's name).
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..options import check_options, option

log = logging.getLogger(__name__)


METHOD_DEFAULTS = {"dpo": (6e-4, 3.0), "kto": (1e-4, 1.0)}
"""(learning rate, epochs) per method, as found on the bundled model; a ceiling, since a
round's drift guard (`rounds.RoundConfig.drift_guard`) stops training where held-out
perplexity says the model has moved far enough. With an audience that likes one
opening in ten, a round has about a dozen pairs: at 3e-4 for 2 epochs (4 to 6 steps)
DPO moved the model little; at 6e-4 for 3 epochs one such round lifted approval by 4 to
18 points (it depends on the draw), and unguarded later rounds, on two and four times
the pairs, overshot perplexity by 13 and 27 %. KTO at 1e-4 for one epoch barely moved
the model in three rounds; at 3e-4 it overshot perplexity."""


LEARNING_RATE_HELP = "learning rate (default: DPO {:g}, KTO {:g})".format(
    METHOD_DEFAULTS["dpo"][0], METHOD_DEFAULTS["kto"][0]
)
EPOCHS_HELP = "passes over the round's examples (default: DPO {:g}, KTO {:g})".format(
    METHOD_DEFAULTS["dpo"][1], METHOD_DEFAULTS["kto"][1]
)


@dataclass(frozen=True)
class TrainConfig:
    """One preference round's training, in TRL's manner: each field with its help and its
    bounds, checked when the config is made; `train round`'s options are these fields."""

    method: Literal["kto", "dpo"] = option(
        "kto", cli=False, help="KTO on single labels, or DPO on preference pairs"
    )
    learning_rate: float | None = option(
        None, flags=("--lr",), above=0, below=1, help=LEARNING_RATE_HELP
    )
    epochs: float | None = option(None, above=0, help=EPOCHS_HELP)
    beta: float = option(
        0.1, above=0, help="how far from the starting adapter a round may move (TRL's beta)"
    )
    sft_weight: float = option(
        0.0,
        low=0,
        help="DPO only: weight of an added likelihood term on the chosen continuations (RPO), "
        "which holds them up where DPO alone lowers chosen and rejected alike",
    )
    batch_size: int = option(
        8, low=2, help="examples per step (KTO needs more than one example a step)"
    )
    lora_r: int = option(16, low=1, help="rank of a fresh LoRA")
    lora_alpha: int = option(32, low=1, help="scale of a fresh LoRA")
    target_modules: tuple[str, ...] = option(
        ("c_attn", "c_proj", "c_fc"), cli=False, help="the layers a fresh LoRA adapts"
    )
    max_length: int = option(1024, low=16, help="tokens per example, at most")
    seed: int = option(0, help="the example order and the trainer's seed")
    min_examples: int = option(
        8, low=1, help="fewer examples than this (pairs for DPO) and the round does not train"
    )

    def __post_init__(self) -> None:
        check_options(self)

    def resolved(self) -> TrainConfig:
        """This config with the method's defaults filled in."""
        lr, epochs = METHOD_DEFAULTS[self.method]
        return replace(
            self,
            learning_rate=self.learning_rate or lr,
            epochs=self.epochs or epochs,
        )


class NotEnoughData(Exception):
    pass


@dataclass
class DriftGuard:
    """Stops training once the policy has drifted too far: every `every` steps (or, with
    `doubling`, after steps 1, 2, 4, 8, ...) and after the last, it measures
    (`measure`, for instance perplexity on held-out stories) and, past `limit`,
    puts back the adapter weights of the last check under it and ends the round's
    training there. The trainer's schedule is a ceiling, the guard the brake: a round
    on few examples runs its schedule, one on many stops where the model has moved far
    enough."""

    measure: Callable[[], float]
    limit: float
    every: int = 2
    doubling: bool = False
    """Check after steps 1, 2, 4, 8, ... instead of every `every`: closely at first,
    where DPO's large steps cross the limit within two or three steps, seldom later.
    A check over the 40 held-out stories costs more than several training steps on
    two CPU cores."""
    checks: list[tuple[int, float]] = field(default_factory=list)
    """(step, measure) at each check."""
    stopped_at: int | None = None
    """The step whose weights were kept, when the guard stopped training."""

    @property
    def kept_value(self) -> float | None:
        """The measure of the weights training ended with: the last check's, or, when
        the guard stopped training, the check's whose weights it put back (None: it
        put back the starting weights, or never checked)."""
        step = self.stopped_at
        if step is None and self.checks:
            step = self.checks[-1][0]
        return next((value for at, value in self.checks if at == step), None)

    def checks_at(self, step: int) -> bool:
        """Whether the guard measures after this step."""
        if self.doubling:
            return step > 0 and step & (step - 1) == 0
        return step % self.every == 0

    def callback(self, policy: Any) -> Any:
        import torch
        from transformers import TrainerCallback

        guard = self
        trainable = [p for p in policy.parameters() if p.requires_grad]

        def snapshot() -> list[Any]:
            return [p.detach().clone() for p in trainable]

        class Guard(TrainerCallback):
            def __init__(self) -> None:
                self.kept, self.kept_step = snapshot(), 0

            def check(self, step: int) -> bool:
                """True when the guard tripped (and the weights were put back)."""
                value = guard.measure()
                guard.checks.append((step, value))
                if value <= guard.limit:
                    self.kept, self.kept_step = snapshot(), step
                    return False
                with torch.no_grad():
                    for p, saved in zip(trainable, self.kept, strict=True):
                        p.copy_(saved)
                guard.stopped_at = self.kept_step
                return True

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if guard.checks_at(state.global_step) and self.check(state.global_step):
                    control.should_training_stop = True

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if guard.stopped_at is None and not guard.checks_at(state.global_step):
                    self.check(state.global_step)  # the last steps, since the last check

        return Guard()


def prepare_policy(base_model: Any, start_adapter: Path | None, config: TrainConfig) -> Any:
    """The model to train: the base with `start_adapter` (trainable, named "default"),
    or with a fresh LoRA, drawn from `config.seed` (not from whatever the process drew
    before: the same round on the same data starts from the same weights)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if start_adapter is not None:
        return PeftModel.from_pretrained(
            base_model, str(start_adapter), adapter_name="default", is_trainable=True
        )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        fan_in_fan_out=True,  # GPT-2's Conv1D layers
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    device = next(base_model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        return get_peft_model(base_model, lora)


def kto_weights(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Desirable/undesirable weights that keep their weighted ratio within TRL's
    guidance (between 1:1 and 4:3)."""
    good = sum(1 for r in rows if r["label"])
    bad = len(rows) - good
    if not good or not bad:
        raise NotEnoughData("KTO needs both liked and disliked examples")
    ratio = good / bad  # weighted desirable : undesirable = ratio * wd / wu
    if ratio < 1:
        return 1.0 / ratio, 1.0  # too few desirable: weigh them up to 1:1
    if ratio > 4 / 3:
        return 1.0, ratio * 3 / 4  # too many: weigh the undesirable up to 4:3
    return 1.0, 1.0


def _kto_trainer(
    policy: Any, tokenizer: Any, data: Any, config: TrainConfig, common: dict[str, Any], out: str
) -> Any:
    """KTO on single 👍/👎 labels (prompt, completion, label), the two sides weighted
    within TRL's guidance (`kto_weights`)."""
    from trl import KTOConfig, KTOTrainer  # pyright: ignore[reportPrivateImportUsage]

    desirable, undesirable = kto_weights(list(data))
    args = KTOConfig(
        output_dir=out, desirable_weight=desirable, undesirable_weight=undesirable, **common
    )
    return KTOTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer)


def _dpo_trainer(
    policy: Any, tokenizer: Any, data: Any, config: TrainConfig, common: dict[str, Any], out: str
) -> Any:
    """DPO on preference pairs (prompt, chosen, rejected), with `sft_weight` an added
    likelihood term on the chosen continuations (RPO)."""
    from trl import DPOConfig, DPOTrainer  # pyright: ignore[reportPrivateImportUsage]

    losses: dict[str, Any] = {}
    if config.sft_weight:
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, config.sft_weight]}
    args = DPOConfig(output_dir=out, **common, **losses)
    return DPOTrainer(model=policy, args=args, train_dataset=data, processing_class=tokenizer)


TRAINERS: dict[str, Callable[..., Any]] = {"kto": _kto_trainer, "dpo": _dpo_trainer}
"""Each preference method and what builds its TRL trainer from the shared arguments."""


MAX_REPEATS = 4
"""The most times `weighted_rows` repeats one row (lighter rows weigh at least a
quarter of the heaviest)."""


def weighted_rows(rows: list[dict[str, Any]], epochs: float) -> tuple[list[dict[str, Any]], float]:
    """Rows' `weight`s made repetitions (TRL's trainers weigh every row alike): each row
    repeated its weight over the lightest's times (rounded; a row lighter than a
    `MAX_REPEATS`th of the heaviest counts as that much), and the epochs divided by the
    most repeats, so the heaviest rows are still seen `epochs` times and lighter ones
    in proportion (a person's pair, 1, three times; the reward model's, 0.5, one and a
    half). Weights are relative to the round's other rows: rows all of one weight (or
    none) are returned as they are. The `weight` key is dropped."""
    weights = [float(row.get("weight", 1.0)) for row in rows]
    plain = [{k: v for k, v in row.items() if k != "weight"} for row in rows]
    if not rows or min(weights) == max(weights):
        return plain, epochs
    if min(weights) <= 0:
        raise ValueError("row weights must be positive")
    weights = [max(w, max(weights) / MAX_REPEATS) for w in weights]
    lightest = min(weights)
    repeats = [max(1, round(w / lightest)) for w in weights]
    out = [row for row, n in zip(plain, repeats, strict=True) for _ in range(n)]
    return out, epochs / max(repeats)


def train_adapter(
    policy: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    config: TrainConfig,
    *,
    callbacks: list[Any] | None = None,
    progress: Callable[[str], None] | None = None,
    guard: DriftGuard | None = None,
) -> dict[str, Any]:
    """Train `policy` in place on `rows` (KTO: prompt/completion/label; DPO:
    prompt/chosen/rejected), reporting each logged step to `progress`; `guard` may stop
    it early. Returns the round's figures."""
    import datasets
    from datasets import Dataset
    from transformers import PrinterCallback

    datasets.disable_progress_bars()

    if len(rows) < config.min_examples:
        raise NotEnoughData(f"{len(rows)} examples; a round needs at least {config.min_examples}")
    config = config.resolved()
    examples = len(rows)
    rows, epochs = weighted_rows(rows, config.epochs or 1.0)
    random.Random(config.seed).shuffle(rows)  # KTO samples in order
    common: dict[str, Any] = {
        "learning_rate": config.learning_rate,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": config.batch_size,
        "beta": config.beta,
        "max_length": config.max_length,
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": runs_on_cpu(policy),
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 5,
        "seed": config.seed,
        "disable_tqdm": True,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taleweaver-train-") as scratch:
        make_trainer = TRAINERS[config.method]
        trainer = make_trainer(policy, tokenizer, Dataset.from_list(rows), config, common, scratch)
        for callback in callbacks or []:
            trainer.add_callback(callback)
        trainer.remove_callback(PrinterCallback)  # progress goes through `progress`
        if progress is not None:
            trainer.add_callback(progress_callback(progress))
        if guard is not None:
            trainer.add_callback(guard.callback(policy))
        result = trainer.train()
        steps = trainer.state.global_step
    if "ref" in policy.peft_config:  # TRL's frozen copy of the starting adapter
        policy.delete_adapter("ref")
    policy.set_adapter("default")
    policy.eval()
    figures = {
        "method": config.method,
        "examples": examples,
        "learning_rate": config.learning_rate,
        "steps": steps,
        "train_loss": float(result.training_loss),
        "seconds": time.perf_counter() - started,
    }
    if guard is not None:
        figures["guard"] = {
            "limit": guard.limit,
            "checks": guard.checks,
            "stopped_at": guard.stopped_at,
        }
    return figures


def progress_callback(progress: Callable[[str], None], task: str = "training") -> Any:
    """A trainer callback (in place of transformers' printer) that reports every step
    through `storyengine.progress`: a bar with the time left in a terminal; elsewhere a
    line to `progress` at the first step, now and then, at each logged loss and at the
    end (`step 3/12 (25%) · loss 0.6931 · 0:04 elapsed · about 0:12 left`), and for a
    front end, structured lines it can draw its own bar from."""
    from transformers import TrainerCallback

    from ..progress import Progress

    class StepProgress(TrainerCallback):
        reporter: Progress | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.reporter = Progress(task, state.max_steps, say=progress)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.reporter is not None:
                self.reporter.update(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.reporter is not None and logs and "loss" in logs:
                self.reporter.note(f"loss {float(logs['loss']):.4f}", say_now=True)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.reporter is not None:
                self.reporter.close()

    return StepProgress()


def runs_on_cpu(policy: Any) -> bool:
    import torch

    return not torch.cuda.is_available() or next(policy.parameters()).device.type == "cpu"


def adapter_kwargs(model: Any, adapter: str | None, rows: int = 1) -> dict[str, Any]:
    """Forward-pass arguments that run a peft model with `adapter` (None: the bare base
    model) on a batch of `rows`, per call: no global adapter switch, so it is safe
    beside a serving thread."""
    if not hasattr(model, "peft_config"):
        return {}
    return {"adapter_names": [adapter or "__base__"] * rows}


@contextmanager
def evaluating(model: Any) -> Iterator[Any]:
    """`model` in eval mode for the block (peft's per-call adapters require it)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def completion_logprob(
    model: Any, tokenizer: Any, prompt: str, completion: str, *, adapter: str | None = "default"
) -> float:
    """log p(completion | prompt) under `model` (with `adapter`), summed over the
    completion's tokens."""
    return completion_logprobs(model, tokenizer, [(prompt, completion)], adapter=adapter)[0]


def completion_logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    *,
    adapter: str | None = "default",
    batch_size: int = 16,
) -> list[float]:
    """log p(completion | prompt) of each (prompt, completion) under `model` (with
    `adapter`), summed over the completion's tokens, in batches (right-padded: a causal
    model's real tokens never see the padding after them)."""
    import torch

    device = next(model.parameters()).device
    encoded = [
        (tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"])
        for prompt, completion in items
    ]
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, (p, c) in enumerate(chunk):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c, device=device)
            mask[row, : len(p) + len(c)] = 1
        with torch.no_grad(), evaluating(model):
            logits = (
                model(
                    input_ids=ids, attention_mask=mask, **adapter_kwargs(model, adapter, len(chunk))
                )
                .logits[:, :-1]
                .float()
            )
        picked = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        for row, (p, c) in enumerate(chunk):
            out.append(float(picked[row, len(p) - 1 : len(p) + len(c) - 1].sum()))
    return out
