"""One DPO and one KTO round on a tiny model move it toward what was preferred, and the
reference is the adapter the round started from."""

import copy

import pytest
import torch

from storyengine.learning.training import (
    DriftGuard,
    NotEnoughData,
    TrainConfig,
    completion_logprob,
    kto_weights,
    prepare_policy,
    train_adapter,
    weighted_rows,
)

pytestmark = pytest.mark.slow

PROMPTS = [f"Story {i}: once upon a time" for i in range(8)]
LIKED = " the cat sat on the warm mat."
DISLIKED = " the dog barked at the moon."


def margin(model, tokenizer) -> float:
    """How much more likely the liked ending is than the disliked one, on average."""
    return sum(
        completion_logprob(model, tokenizer, p, LIKED)
        - completion_logprob(model, tokenizer, p, DISLIKED)
        for p in PROMPTS
    ) / len(PROMPTS)


@pytest.fixture
def fresh(tiny_model):
    return copy.deepcopy(tiny_model.model), tiny_model.tokenizer


CONFIG = dict(
    learning_rate=5e-3,
    epochs=3,
    batch_size=4,
    lora_r=8,
    lora_alpha=16,
    max_length=64,
    min_examples=4,
)


def test_dpo_round_prefers_the_chosen(fresh):
    model, tokenizer = fresh
    policy = prepare_policy(model, None, TrainConfig(method="dpo", **CONFIG))
    before = margin(policy, tokenizer)
    rows = [{"prompt": p, "chosen": LIKED, "rejected": DISLIKED} for p in PROMPTS]
    report = train_adapter(policy, tokenizer, rows, TrainConfig(method="dpo", **CONFIG))
    after = margin(policy, tokenizer)
    assert after > before + 1.0, (before, after)
    assert report["examples"] == 8 and list(policy.peft_config) == ["default"]


def test_an_sft_weight_holds_up_the_likelihood_of_the_chosen(tiny_model):
    """DPO alone may lower the chosen continuation's likelihood along with the rejected
    one's; with `sft_weight` the chosen one ends up more likely than without it."""
    rows = [{"prompt": p, "chosen": LIKED, "rejected": DISLIKED} for p in PROMPTS]

    def chosen_logprob(sft_weight: float) -> float:
        config = TrainConfig(method="dpo", sft_weight=sft_weight, **CONFIG)
        policy = prepare_policy(copy.deepcopy(tiny_model.model), None, config)
        train_adapter(policy, tiny_model.tokenizer, rows, config)
        return sum(completion_logprob(policy, tiny_model.tokenizer, p, LIKED) for p in PROMPTS)

    assert chosen_logprob(1.0) > chosen_logprob(0.0) + 1.0


def test_kto_round_moves_toward_the_liked(fresh):
    model, tokenizer = fresh
    policy = prepare_policy(model, None, TrainConfig(**CONFIG))
    before = margin(policy, tokenizer)
    rows = [{"prompt": p, "completion": LIKED, "label": True} for p in PROMPTS] + [
        {"prompt": p, "completion": DISLIKED, "label": False} for p in PROMPTS
    ]
    train_adapter(policy, tokenizer, rows, TrainConfig(**CONFIG))
    assert margin(policy, tokenizer) > before + 1.0


def test_the_drift_guard_stops_training_and_keeps_the_weights_of_its_last_good_check(fresh):
    """The guard measures every `every` steps; past its limit it puts back the adapter
    weights of the check before and ends training there."""
    model, tokenizer = fresh
    config = TrainConfig(method="dpo", **CONFIG)  # 8 pairs, batch 4, 3 epochs: 6 steps
    policy = prepare_policy(model, None, config)

    def drift() -> float:  # how far the fresh LoRA (B = 0) has moved
        return sum(float(p.detach().norm()) for n, p in policy.named_parameters() if "lora_B" in n)

    def measure() -> float:  # the real drift for two checks, then past any limit
        return drift() if len(guard.checks) < 2 else float("inf")

    guard = DriftGuard(measure, limit=1e9, every=1)
    rows = [{"prompt": p, "chosen": LIKED, "rejected": DISLIKED} for p in PROMPTS]
    report = train_adapter(policy, tokenizer, rows, config, guard=guard)
    assert [step for step, _ in guard.checks] == [1, 2, 3]
    assert report["steps"] == 3 and guard.stopped_at == 2
    assert 0 < guard.checks[0][1] < guard.checks[1][1]
    assert drift() == pytest.approx(guard.checks[1][1])  # step 2's weights, not step 3's
    assert report["guard"]["stopped_at"] == 2


def test_without_tripping_the_guard_checks_the_last_steps_too(fresh):
    model, tokenizer = fresh
    config = TrainConfig(method="dpo", **CONFIG)
    policy = prepare_policy(model, None, config)
    guard = DriftGuard(lambda: 0.0, limit=1.0, every=4)
    rows = [{"prompt": p, "chosen": LIKED, "rejected": DISLIKED} for p in PROMPTS]
    report = train_adapter(policy, tokenizer, rows, config, guard=guard)
    assert report["steps"] == 6 and guard.stopped_at is None
    assert report["learning_rate"] == CONFIG["learning_rate"]
    assert [step for step, _ in guard.checks] == [4, 6]


def test_a_doubling_guard_checks_closely_at_first_and_knows_the_kept_weights_measure(fresh):
    """A check costs a pass over the held-out stories: the rounds' guard checks after
    steps 1, 2, 4, ... and the last, not after every step; what training ended with is
    known."""
    model, tokenizer = fresh
    config = TrainConfig(method="dpo", **CONFIG)  # 6 steps
    policy = prepare_policy(model, None, config)
    values = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    guard = DriftGuard(lambda: next(values), limit=10.0, doubling=True)
    rows = [{"prompt": p, "chosen": LIKED, "rejected": DISLIKED} for p in PROMPTS]
    train_adapter(policy, tokenizer, rows, config, guard=guard)
    assert [step for step, _ in guard.checks] == [1, 2, 4, 6]
    assert guard.kept_value == 4.0
    tripped = DriftGuard(lambda: next(values), limit=0.5, doubling=True)
    train_adapter(policy, tokenizer, rows, config, guard=tripped)
    assert tripped.stopped_at == 0 and tripped.kept_value is None  # the starting weights
    assert DriftGuard(lambda: 0.0, 1.0, checks=[(2, 0.4), (4, 0.9)], stopped_at=2).kept_value == 0.4


def test_the_reference_is_the_adapter_the_round_started_from(fresh, tmp_path):
    """Training on top of a served adapter scores against a frozen copy of it (TRL's
    "ref" adapter), not against the bare base model; the copy is gone afterwards."""
    from transformers import TrainerCallback

    model, tokenizer = fresh
    start = prepare_policy(copy.deepcopy(model), None, TrainConfig(**CONFIG))
    for name, param in start.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    start.save_pretrained(tmp_path / "served")
    served = {n: p.detach().clone() for n, p in start.named_parameters() if "lora_" in n}

    seen: dict[str, torch.Tensor] = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                if ".ref." in name:
                    seen[name.replace(".ref.", ".default.")] = param.detach().clone()

    policy = prepare_policy(model, tmp_path / "served", TrainConfig(method="dpo", **CONFIG))
    rows = [{"prompt": p, "chosen": LIKED, "rejected": DISLIKED} for p in PROMPTS]
    train_adapter(policy, tokenizer, rows, TrainConfig(method="dpo", **CONFIG), callbacks=[Spy()])
    assert seen, "no frozen reference adapter was used"
    for name, value in seen.items():
        torch.testing.assert_close(value, served[name])  # reference == the served adapter
    assert "ref" not in policy.peft_config
    trained = dict(policy.named_parameters())
    assert any(not torch.equal(trained[n], served[n]) for n in served)  # and training moved on


def test_kto_weights_and_minimums():
    rows = lambda good, bad: [{"label": True}] * good + [{"label": False}] * bad  # noqa: E731
    assert kto_weights(rows(10, 10)) == (1.0, 1.0)
    assert kto_weights(rows(5, 10)) == (2.0, 1.0)  # desirable weighed up to 1:1
    wd, wu = kto_weights(rows(40, 10))
    assert wd == 1.0 and abs(40 * wd / (10 * wu) - 4 / 3) < 1e-9
    with pytest.raises(NotEnoughData):
        kto_weights(rows(10, 0))
    with pytest.raises(ValueError):
        TrainConfig(batch_size=1)


@pytest.mark.parametrize(("asked", "trained"), [("float16", "float32"), ("bfloat16", "bfloat16")])
def test_training_loads_the_base_model_in_a_precision_it_can_train_in(asked, trained):
    """The serving default on a GPU is float16, whose weights train badly without loss
    scaling: a round loads float32 instead (bfloat16, when asked for, is kept)."""
    from storyengine.config import Settings
    from storyengine.serving.modeling import load_for_training

    loaded = load_for_training(Settings(device="cpu", dtype=asked, adapter="some-adapter"))
    assert next(loaded.model.parameters()).dtype == getattr(torch, trained)
    assert not hasattr(loaded.model, "peft_config")  # the base alone: the round adds LoRA


def test_a_short_round_reports_its_first_and_last_step(fresh, monkeypatch):
    """A round of two steps used to print nothing (a loss line every 5 steps): now the
    first step and the last are reported, with the time left."""
    monkeypatch.setenv("STORY_PROGRESS", "lines")  # as in a log, not a terminal
    model, tokenizer = fresh
    config = TrainConfig(method="dpo", **{**CONFIG, "epochs": 1})
    policy = prepare_policy(model, None, config)
    rows = [{"prompt": p, "chosen": LIKED, "rejected": DISLIKED} for p in PROMPTS]
    lines: list[str] = []
    report = train_adapter(policy, tokenizer, rows, config, progress=lines.append)
    assert report["steps"] == 2
    assert [line.split(" ·")[0] for line in lines] == ["step 1/2 (50%)", "step 2/2 (100%)"]
    assert "left" in lines[0] and "elapsed" in lines[-1]


def test_a_fresh_adapter_starts_from_its_seed_whatever_was_drawn_before():
    """The same round on the same data starts from the same weights: the reward model's
    work, or anything else drawn from the global generator first, changes nothing."""
    from storyengine.learning.training import TrainConfig, prepare_policy
    from tests.helpers.models import make_tiny_model

    def lora_a(draw_first: int) -> list:
        torch.manual_seed(123)
        torch.rand(draw_first)
        policy = prepare_policy(make_tiny_model().model, None, TrainConfig(seed=4))
        return [p.detach().clone() for n, p in policy.named_parameters() if "lora_A" in n]

    first, second = lora_a(0), lora_a(1000)
    assert first and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = prepare_policy(make_tiny_model().model, None, TrainConfig(seed=5))
    moved = [p for n, p in other.named_parameters() if "lora_A" in n]
    assert not torch.equal(moved[0], first[0])


def test_row_weights_become_repetitions():
    """TRL weighs every row alike: a row weighing twice another is repeated twice as
    often, and the epochs shrink so the heaviest rows are still seen `epochs` times."""
    person = {"prompt": "P", "chosen": "a", "rejected": "b", "weight": 1.0}
    made = {"prompt": "Q", "chosen": "c", "rejected": "d", "weight": 0.5}
    rows, epochs = weighted_rows([person, made], 3.0)
    assert sorted(r["prompt"] for r in rows) == ["P", "P", "Q"] and epochs == 1.5
    assert all("weight" not in r for r in rows)
    rows, epochs = weighted_rows([made, made], 3.0)  # all alike: as they are
    assert len(rows) == 2 and epochs == 3.0 and all("weight" not in r for r in rows)
    rows, _ = weighted_rows([person, {**made, "weight": 0.01}], 3.0)
    assert [r["prompt"] for r in rows].count("P") == 4  # at most MAX_REPEATS
    with pytest.raises(ValueError):
        weighted_rows([person, {**made, "weight": 0.0}], 3.0)


def test_dpo_trains_on_weighted_rows(fresh):
    """The weights reach training as repetitions (TRL never sees the column); the
    report counts the rows given."""
    model, tokenizer = fresh
    config = TrainConfig(method="dpo", **CONFIG)
    policy = prepare_policy(model, None, config)
    before = margin(policy, tokenizer)
    rows = [
        {"prompt": p, "chosen": LIKED, "rejected": DISLIKED, "weight": 1.0 if i % 2 else 0.5}
        for i, p in enumerate(PROMPTS)
    ]
    report = train_adapter(policy, tokenizer, rows, config)
    assert margin(policy, tokenizer) > before + 1.0
    assert report["examples"] == 8
