"""The reward model: trained from feedback in a real SQLite file through the same
datasets as the adapter, on real models (the bundled one where words must mean
something, the tiny random GPT-2 where they need not); its held-out judgement and gate;
its files; its registry."""

import random
from dataclasses import replace

import pytest

from storyengine.config import Settings
from storyengine.errors import InvalidInput
from storyengine.learning.datasets import (
    DatasetConfig,
    FeedbackDatasets,
    LabelledExample,
    PreferencePair,
    build_datasets,
)
from storyengine.learning.reward import (
    FeatureSpec,
    RewardConfig,
    RewardModel,
    RewardModelMismatch,
    RewardRegistry,
    continuation_features,
    gate,
    heldout_report,
    heldout_split,
    reward_dir,
    reward_skip_reason,
    reward_summary,
    train_reward_model,
    training_split,
)
from storyengine.serving.modeling import LoadedModel
from storyengine.storage.store import Store
from tests.helpers.models import record_text

PROMPT = "Once upon a time, Lily went to the park and found a red ball.\n"
CAT = [
    "A little cat sat on the bench and purred at her.",
    "She saw a cat with soft grey fur under a tree.",
    "The cat ran after the ball and Lily laughed.",
    "A black cat jumped into her lap and fell asleep.",
    "Her cat came along and played with the ball all day.",
    "Lily gave the ball to a small cat, who batted it around.",
]
NO_CAT = [
    "She threw the ball over the fence and went home.",
    "It started to rain, so Lily ran back inside.",
    "The ball was old and had a hole in it.",
    "Lily put the ball in her bag and walked to school.",
    "Her mom called her for dinner, and she left the park.",
    "Lily kicked the ball against the wall again and again.",
]

SEEN = [
    "A {} sat by the door and looked at the rain.",
    "The {} ran across the garden to find the ball.",
    "Lily saw a {} sleeping under the warm blanket.",
    "In the morning, the {} played with the red ball.",
]
NEW = [
    "After lunch, a {} climbed onto the old chair.",
    "The little {} found a shiny key in the grass.",
    "Lily and the {} walked home before dark.",
    "A {} was waiting for her at the gate.",
]
"""Sentences that differ only in who is in them: the audience below likes a cat."""


def example(prompt: str, text: str, liked: bool, n: int, split: str = "train") -> LabelledExample:
    return LabelledExample(prompt, text, liked, 1.0 if liked else -1.0, n, split, n)


async def feedback_db(path, votes: list[tuple[str, str, str, float]]) -> Store:
    """A database with one story per (channel, text, user, value) vote: the story's
    generation of `text` after PROMPT, and the user's 👍 or 👎 on it."""
    store = await Store(path).open()
    for channel, text, user, value in votes:
        story = await store.create_story(channel, "P.", genre=None, mode="solo", created_by="u")
        g = await record_text(store, story.id, PROMPT, text)
        await store.set_feedback(g, user, "👍" if value > 0 else "👎", value)
    return store


ALL_TRAIN = DatasetConfig(heldout_fraction=0.0)


@pytest.mark.slow
async def test_a_handful_of_labels_teaches_it_what_the_audience_likes(tmp_path, bundled_model):
    """8 reactions, 👍 where a cat is in the continuation, 👎 where a boy is: in new
    sentences the cat's version ranks first."""
    votes = [(f"a{i}", t.format("cat"), f"u{i}", 1.0) for i, t in enumerate(SEEN)]
    votes += [(f"b{i}", t.format("boy"), f"v{i}", -1.0) for i, t in enumerate(SEEN)]
    store = await feedback_db(tmp_path / "s.db", votes)
    data = await build_datasets(store, ALL_TRAIN)
    await store.close()
    assert len(data.examples) == 8

    model = RewardModel.train(bundled_model, data)
    scores = model.score([PROMPT] * 8, [t.format(who) for t in NEW for who in ("cat", "boy")])
    assert all(scores[2 * i] > scores[2 * i + 1] for i in range(len(NEW))), scores
    assert model.info["train"]["labels"] == 8 and model.info["train"]["seconds"] < 30


@pytest.mark.slow
async def test_pairs_alone_teach_it_too(bundled_model):
    """Companion choices only (no single labels): the chosen side wins afterwards."""
    pairs = [
        PreferencePair(
            PROMPT, t.format("cat"), t.format("car"), "choice", i, "train", 2 * i, 2 * i + 1
        )
        for i, t in enumerate(SEEN)
    ]
    model = RewardModel.train(bundled_model, FeedbackDatasets(pairs=pairs))
    scores = model.score([PROMPT] * 8, [t.format(what) for t in NEW for what in ("cat", "car")])
    assert all(scores[2 * i] > scores[2 * i + 1] for i in range(len(NEW))), scores
    assert model.info["train"]["pairs"] == 4


async def test_forget_me_removes_a_users_labels_from_the_next_training_data(tmp_path, tiny_model):
    """A user who asked to be forgotten: their reactions are not in the reward model's
    next training data (built again from the database), the others' are."""
    votes = [(f"a{i}", f"Liked {i}.", "ann", 1.0) for i in range(5)]
    votes += [(f"b{i}", f"Disliked {i}.", "ann", -1.0) for i in range(5)]
    votes += [(f"c{i}", f"Other {i}.", "bob", 1.0 if i % 2 else -1.0) for i in range(6)]
    store = await feedback_db(tmp_path / "s.db", votes)
    before = await build_datasets(store, ALL_TRAIN)
    assert RewardModel.train(tiny_model, before).info["train"]["labels"] == 16

    await store.forget_user("ann")
    after = await build_datasets(store, ALL_TRAIN)
    await store.close()
    pairs, labels = training_split(after, RewardConfig())
    assert sorted(e.completion for e in labels) == [f"Other {i}." for i in range(6)]
    assert pairs and all(p.chosen.startswith("Other") for p in pairs)
    assert all(p.rejected.startswith("Other") for p in pairs)
    assert RewardModel.train(tiny_model, after).info["train"]["labels"] == 6


async def test_forget_me_drops_prompts_holding_the_users_lines(tmp_path, tiny_model):
    """Someone else's reaction to a continuation of a forgotten user's line: that
    example is not trained on either (its prompt holds the line)."""
    store = await Store(tmp_path / "s.db").open()
    story = await store.create_story("c", "P.", genre=None, mode="solo", created_by="u")
    await store.add_turn(
        story.id, action=1, kind="user", text="Ann's secret line.", author_id="ann"
    )
    for i, value in enumerate((1.0, -1.0)):
        g = await record_text(store, story.id, f"Ann's secret line.\n{i}", f"Reply {i}.")
        await store.set_feedback(g, "bob", "👍", value)
    assert len((await build_datasets(store, ALL_TRAIN)).examples) == 2
    await store.forget_user("ann")
    data = await build_datasets(store, ALL_TRAIN)
    await store.close()
    assert data.examples == [] and reward_skip_reason(RewardConfig(), data) is not None


def cat_world(n: int, *, seed: int, random_labels: bool = False) -> FeedbackDatasets:
    """`n` labelled continuations on each side of the split; liked: a cat appears
    (on the training side, when `random_labels`, a coin decides instead)."""
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max"]
    out = FeedbackDatasets()
    for i in range(2 * n):
        split = "train" if i < n else "heldout"
        name = names[i % len(names)]
        liked = i % 2 == 0
        pool = CAT if liked else NO_CAT
        text = pool[rng.randrange(len(pool))].replace("Lily", name)
        prompt = PROMPT.replace("Lily", name)
        label = rng.random() < 0.5 if random_labels and split == "train" else liked
        out.examples.append(example(prompt, text, label, i, split))
    return out


@pytest.mark.slow
async def test_the_gate_refuses_a_reward_model_trained_on_random_labels(tmp_path, bundled_model):
    """Trained on coin flips, it ranks the held-out feedback no better than chance: the
    gate rejects it and nothing is promoted. The same examples with their true labels
    pass."""
    store = await Store(tmp_path / "s.db").open()
    registry = await RewardRegistry(store, tmp_path / "rewards").open()
    config = RewardConfig(cross_validate_below=0)  # judged on the held-out side

    noise = await train_reward_model(
        registry, bundled_model, cat_world(24, seed=1, random_labels=True), config
    )
    assert noise["status"] == "rejected", noise
    assert noise["p_value"] >= config.significance
    assert "not clearly above chance" in noise["reason"]
    assert await registry.promoted() is None
    assert (await registry.get(noise["version"])).status == "rejected"

    honest = await train_reward_model(registry, bundled_model, cat_world(24, seed=1), config)
    assert honest["status"] == "promoted", honest
    assert honest["p_value"] < config.significance and honest["label_auc"] > 0.8
    assert (await registry.promoted()).version == honest["version"]
    await store.close()


@pytest.mark.slow
async def test_a_new_reward_model_is_judged_against_the_promoted_one(tmp_path, bundled_model):
    """On the same held-out examples: a worse one is rejected and the promoted one
    stays; one as good replaces it."""
    store = await Store(tmp_path / "s.db").open()
    registry = await RewardRegistry(store, tmp_path / "rewards").open()
    config = RewardConfig(cross_validate_below=0)  # judged on the held-out side
    first = await train_reward_model(registry, bundled_model, cat_world(16, seed=2), config)
    assert first["status"] == "promoted", first
    worse = await train_reward_model(
        registry, bundled_model, cat_world(16, seed=2, random_labels=True), config
    )
    assert worse["current_version"] == first["version"]
    assert worse["current_accuracy"] == pytest.approx(first["accuracy"])
    assert worse["status"] == "rejected"
    assert f"below r1's {first['accuracy']:.2f} on the same 16 examples" in worse["reason"]
    assert (await registry.promoted()).version == first["version"]
    again = await train_reward_model(registry, bundled_model, cat_world(16, seed=2), config)
    assert again["status"] == "promoted" and again["accuracy"] == first["accuracy"]
    assert [v.status for v in await registry.list()] == ["retired", "rejected", "promoted"]
    await store.close()


@pytest.mark.slow
async def test_little_feedback_is_judged_by_cross_validation_and_all_of_it_trains(
    tmp_path, bundled_model
):
    """With too little held out to judge on (a server's first reactions), every story
    is scored by a head that never saw it, and the model kept learns from all of it:
    coin flips are still refused, the truth passes."""
    store = await Store(tmp_path / "s.db").open()
    registry = await RewardRegistry(store, tmp_path / "rewards").open()
    config = RewardConfig()
    noise = cat_world(16, seed=3)
    rng = random.Random(4)
    noise.examples = [replace(e, label=rng.random() < 0.5) for e in noise.examples]
    refused = await train_reward_model(registry, bundled_model, noise, config)
    assert refused["judged_by"] == "cross-validation"
    assert refused["status"] == "rejected" and "not clearly above chance" in refused["reason"]

    world = cat_world(16, seed=3)  # 32 labels, 16 of them held out: under 100
    kept = await train_reward_model(registry, bundled_model, world, config)
    assert kept["judged_by"] == "cross-validation" and kept["status"] == "promoted", kept
    assert kept["labels"] == 32 and kept["train"]["labels"] == 32  # judged on all, trained on all
    assert kept["label_auc"] > 0.8
    assert "cross-validated" in reward_summary(kept)

    # It learned from every one of these stories: a rival cannot be compared with it
    # on them, and says so; on stories it never saw, it is.
    again = await train_reward_model(registry, bundled_model, world, config)
    assert again["current_accuracy"] is None
    assert "learned from all but 0 of these examples" in again["note"]
    newer = cat_world(16, seed=5)
    newer.examples = [replace(e, story_id=e.story_id + 1000) for e in newer.examples]
    both = FeedbackDatasets(examples=world.examples + newer.examples)
    compared = await train_reward_model(registry, bundled_model, both, config)
    assert compared["current_accuracy"] is not None  # on the 32 newer ones
    await store.close()


def test_the_gate_rule():
    config = RewardConfig()

    def report(accuracy: float, p: float):
        from storyengine.learning.reward import HeldoutReport

        return HeldoutReport(accuracy, p, 10, accuracy, 0, None, None, 10)

    assert gate(config, report(0.9, 0.01)) == []
    assert gate(config, report(0.9, 0.01), report(0.85, 0.01)) == []
    assert gate(config, report(0.9, 0.01), report(0.9, 0.01)) == []  # as good: fine
    (reason,) = gate(config, report(0.8, 0.01), report(0.9, 0.001), "r3")
    assert reason == "held-out accuracy 0.80 is below r3's 0.90 on the same 10 examples"
    (reason,) = gate(config, report(0.7, 0.2))
    assert reason.startswith("held-out accuracy 0.70 is not clearly above chance (p = 0.20")


def pair(n: int) -> PreferencePair:
    return PreferencePair("p", f"a{n}", f"b{n}", "choice", n, "heldout", 1000 + 2 * n, 1001 + 2 * n)


def test_held_out_pairs_are_tested_against_coin_flips():
    """9 of 10 pairs right: the chance of that or better by coin flips is 11/1024."""
    report = heldout_report(
        [pair(n) for n in range(10)], [1.0] * 9 + [-1.0], [], [], permutations=20000
    )
    assert report.accuracy == pytest.approx(0.9) and report.pair_accuracy == pytest.approx(0.9)
    assert report.p_value == pytest.approx(11 / 1024, abs=0.003)


def test_a_scorer_that_knows_nothing_gets_no_credit_for_a_one_sided_audience():
    """Nine 👎 in ten: scoring everything below zero gets 90 % of the labels right, but
    ranks nothing, so it is no better than chance."""
    labels = [example("p", f"c{n}", n == 0, n, "heldout") for n in range(30)]
    constant = heldout_report([], [], labels, [-1.0] * 30)
    assert constant.label_accuracy == pytest.approx(29 / 30)
    assert constant.label_auc == 0.5 and constant.accuracy == 0.5
    assert constant.p_value > 0.5
    perfect = heldout_report([], [], labels, [1.0] + [-1.0] * 29)
    assert perfect.label_auc == 1.0 and perfect.p_value == pytest.approx(1 / 30, abs=0.01)


def test_a_pair_that_repeats_two_held_out_labels_is_not_counted_twice():
    labels = [example("p", "a", True, 1, "heldout"), example("p", "b", False, 2, "heldout")]
    pairs = [PreferencePair("p", "a", "b", "score", 1, "heldout", 1, 2), pair(7)]
    report = heldout_report(pairs, [1.0, 1.0], labels, [1.0, -1.0])
    assert report.pairs == 2 and report.judged_pairs == 1


def test_skip_reasons_say_what_is_missing():
    config = RewardConfig()
    few = FeedbackDatasets(examples=[example("p", f"c{n}", n % 2 == 0, n) for n in range(5)])
    assert reward_skip_reason(config, few) == (
        "not enough feedback yet: 5 training examples (a reward model needs 8), 0 held out"
    )
    liked = FeedbackDatasets(examples=[example("p", f"c{n}", True, n) for n in range(9)])
    assert reward_skip_reason(config, liked) == (
        "all 9 rated continuations are liked (👍): nothing tells good from bad yet"
    )
    unjudged = cat_world(8, seed=0)
    unjudged.examples[:] = [e for e in unjudged.examples if e.split == "train"]
    assert reward_skip_reason(config, unjudged).startswith("too little held-out")  # 8: few
    many = cat_world(32, seed=0)
    many.examples[:] = [e for e in many.examples if e.split == "train"]
    assert reward_skip_reason(config, many) is None  # judged by cross-validation
    few_stories = FeedbackDatasets(
        examples=[replace(e, story_id=e.story_id % 3) for e in many.examples]
    )
    assert reward_skip_reason(config, few_stories) == (
        "too little feedback to judge one: 3 stories rated (a reward model is judged on 5"
        " folds of stories)"
    )
    config = RewardConfig(cross_validate_below=0)
    assert reward_skip_reason(config, unjudged).startswith(
        "too little held-out feedback to judge one: 0 held-out examples"
    )
    assert reward_skip_reason(config, cat_world(8, seed=0)) is None


def test_save_and_load_give_the_same_scores(tmp_path, tiny_model):
    model = RewardModel.train(tiny_model, cat_world(8, seed=3))
    texts = CAT[:3] + NO_CAT[:3]
    model.save(tmp_path / "r")
    loaded = RewardModel.load(tmp_path / "r", tiny_model)
    assert loaded.score([PROMPT] * 6, texts) == model.score([PROMPT] * 6, texts)
    assert loaded.spec == model.spec and loaded.info == model.info
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "head.safetensors",
        "reward.json",
    ]


def test_scores_do_not_depend_on_the_batch(tiny_model):
    """Padding, batching and order change nothing: a continuation scores the same alone
    and among others of other lengths."""
    model = RewardModel.train(tiny_model, cat_world(8, seed=4))
    texts = [CAT[0], NO_CAT[1] * 3, "Yes.", CAT[2]]
    prompts = [PROMPT, PROMPT * 3, "x", PROMPT]
    together = model.score(prompts, texts, batch_size=4)
    alone = [model.score([p], [t])[0] for p, t in zip(prompts, texts, strict=True)]
    assert together == pytest.approx(alone, abs=1e-4)


def test_a_head_refuses_to_load_onto_another_base_model(tmp_path, tiny_model, bundled_model):
    RewardModel.train(tiny_model, cat_world(8, seed=5)).save(tmp_path / "r")
    with pytest.raises(RewardModelMismatch, match="trained on the base model test:tiny-gpt2"):
        RewardModel.load(tmp_path / "r", bundled_model)
    renamed = LoadedModel(tiny_model.model, tiny_model.tokenizer, "gpt2", None, tiny_model.device)
    with pytest.raises(RewardModelMismatch, match="not on gpt2"):
        RewardModel.load(tmp_path / "r", renamed)


def test_scoring_ignores_the_lora_adapters_the_serving_model_carries(tiny_lora_model):
    """The reward model reads the bare base model, whatever adapter is active."""
    model = RewardModel.train(tiny_lora_model, cat_world(8, seed=6))
    texts = [CAT[0], NO_CAT[0]]
    first = model.score([PROMPT] * 2, texts)
    tiny_lora_model.model.set_adapter("owl")
    try:
        assert model.score([PROMPT] * 2, texts) == pytest.approx(first, abs=1e-5)
    finally:
        tiny_lora_model.model.set_adapter("fox")
    with tiny_lora_model.model.disable_adapter():
        assert model.score([PROMPT] * 2, texts) == pytest.approx(first, abs=1e-5)


def test_scoring_a_lora_model_leaves_no_adapter_hooks_behind(tiny_lora_model):
    """peft's per-call adapter hooks are removed only when the forward pass returns: a
    pass stopped early left them on, and the next call with another batch size failed
    ("Length of `adapter_names` should be the same as the number of inputs"), which broke
    every training round that scored features first."""
    import torch

    spec = FeatureSpec(depths=(0.5,))
    continuation_features(tiny_lora_model, spec, [PROMPT] * 3, CAT[:3])
    lora_hooks = [
        len(module._forward_pre_hooks)
        for module in tiny_lora_model.model.modules()
        if hasattr(module, "lora_A")
    ]
    assert lora_hooks and not any(lora_hooks)
    ids = torch.tensor([tiny_lora_model.encode(PROMPT)] * 2)
    with torch.no_grad():
        assert tiny_lora_model.model(input_ids=ids).logits.shape[0] == 2


def test_feature_spec_says_what_is_wrong():
    with pytest.raises(ValueError, match="unknown pooling"):
        FeatureSpec(pooling=("median",))
    with pytest.raises(ValueError, match="at least one depth"):
        FeatureSpec(depths=())
    with pytest.raises(ValueError, match="shares of the model's blocks"):
        FeatureSpec(depths=(0.0,))
    assert FeatureSpec(depths=(0.5, 1.0)).layers(8) == (4, 8)
    assert FeatureSpec(depths=(0.1,)).layers(8) == (1,)


def test_the_forward_pass_stops_at_the_middle_and_reads_the_same_hidden_states(tiny_model):
    """The features (after the middle block) equal the middle hidden state of a full
    forward pass, pooled by hand; no hook is left on the model."""
    import torch

    blocks = tiny_model.model.transformer.h
    hooks = [dict(block._forward_hooks) for block in blocks]
    spec = FeatureSpec(depths=(0.5,), pooling=("mean", "max", "last"), max_prompt_tokens=4)
    prompt, text = "Once upon a time, there was a fox.", "The fox ran home."
    (features,) = continuation_features(tiny_model, spec, [prompt], [text])
    assert [dict(block._forward_hooks) for block in blocks] == hooks
    context = tiny_model.encode(prompt)[-4:]
    ids = torch.tensor([context + tiny_model.encode(text)])
    with torch.no_grad():
        hidden = tiny_model.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    own = hidden[0, len(context) :]
    expected = torch.cat([own.mean(0), own.max(0).values, own[-1]])
    assert torch.allclose(features, expected, atol=1e-5)


# -- the registry ----------------------------------------------------------------------


async def test_the_registry_keeps_one_promoted_per_lineage_and_rolls_back(tmp_path, tiny_model):
    store = await Store(tmp_path / "s.db").open()
    registry = await RewardRegistry(store, tmp_path / "rewards").open()
    model = RewardModel.train(tiny_model, cat_world(8, seed=7))
    shared = [await registry.register(model.save) for _ in range(2)]
    guild = await registry.register(model.save, community="g1")
    for v in (*shared, guild):
        await registry.promote(v.version)
    assert [(v.version, v.status) for v in await registry.list()] == [
        (1, "retired"),
        (2, "promoted"),
        (3, "promoted"),
    ]
    assert (await registry.promoted()).version == 2
    assert (await registry.promoted("g1")).version == 3
    assert (await registry.rollback()).version == 1  # the shared lineage only
    assert (await registry.promoted("g1")).version == 3
    assert (await registry.get(2)).status == "rejected"
    assert await registry.rollback() is None
    with pytest.raises(InvalidInput, match="No reward model is promoted"):
        await registry.rollback()
    loaded = registry.load(await registry.promoted("g1"), tiny_model)
    assert loaded.score([PROMPT], [CAT[0]]) == model.score([PROMPT], [CAT[0]])
    with pytest.raises(InvalidInput, match="no reward model version 9"):
        await registry.promote(9)
    await store.close()


def test_reward_models_live_beside_the_adapters(tmp_path):
    settings = Settings(adapter_dir=tmp_path / "adapters")
    assert reward_dir(settings) == tmp_path / "adapters-rewards"


def test_it_never_learns_from_pairs_a_reward_model_made():
    """On-policy pairs (source "reward") would teach it its own mistakes, and never
    judge it."""
    ours = PreferencePair("p", "a", "b", "choice", 1, "train", 1, 2)
    made = PreferencePair("p", "c", "d", "reward", 1, "train", 3, 4, 0.5)
    held = PreferencePair("p", "e", "f", "reward", 2, "heldout", 5, 6, 0.5)
    data = FeedbackDatasets(pairs=[ours, made, held])
    assert training_split(data, RewardConfig()) == ([ours], [])
    assert heldout_split(data, RewardConfig()) == ([], [])


def test_one_held_out_pair_does_not_outweigh_many_labels():
    """A round with 1 held-out pair (got wrong) and 40 well-ranked labels: the mean of
    the two kinds made it 0.5 and rejected a reward model that ranks well."""
    labels = [example("p", f"c{n}", n < 10, n, "heldout") for n in range(40)]
    scores = [1.0 if n < 10 else -1.0 for n in range(40)]
    report = heldout_report([pair(99)], [-1.0], labels, scores)
    assert report.label_auc == 1.0 and report.pair_accuracy == 0.0
    # evidence: 1 pair against 2 * 10 * 30 / 40 = 15 for the labels
    assert report.accuracy == pytest.approx(15 / 16)
    assert report.p_value < 0.01


def test_folds_hold_the_same_share_of_each_kind_of_story():
    """A rare taste's few 👍 stories are spread over the folds, not dealt by chance
    into one (whose head, trained on none, would rank nothing)."""
    from storyengine.learning.reward import deal_folds

    labels = [example("p", f"c{n}", n < 5, n) for n in range(50)]  # 5 liked stories
    fold = deal_folds([], labels, RewardConfig(folds=5))
    assert sorted(fold[n] for n in range(5)) == [0, 1, 2, 3, 4]
    assert sorted(list(fold.values()).count(k) for k in range(5)) == [10] * 5


def test_features_in_a_memo_are_not_computed_again(monkeypatch):
    """A round's reward model and its judge read the same feedback: the base model's
    features of a continuation are computed once for both."""
    import torch

    from storyengine.learning import reward as reward_module
    from storyengine.learning.reward import Features

    computed: list[tuple[str, str]] = []

    def features(base, spec, prompts, continuations, batch_size=16):
        computed.extend(zip(prompts, continuations, strict=True))
        return torch.tensor([[float(len(c))] for c in continuations]).reshape(-1, 1)

    monkeypatch.setattr(reward_module, "continuation_features", features)
    first = [LabelledExample("P:", " a", True, 1.0, 1, "train", 1)]
    second = [*first, LabelledExample("Q:", " ccc", False, -1.0, 2, "train", 2)]
    memo: dict = {}
    Features.of(None, RewardConfig(), [], first, memo)
    table = Features.of(None, RewardConfig(), [], second, memo)
    assert computed == [("P:", " a"), ("Q:", " ccc")]  # " a" once
    assert table([("Q:", " ccc"), ("P:", " a")]).tolist() == [[4.0], [2.0]]
    assert Features.of(None, RewardConfig(), [], []).table.shape[0] == 0


def test_scores_through_a_memo_equal_scores_without_and_reuse_its_features(tiny_model):
    """Two reward models ranking the same candidates (the bench ranks the base model's
    with every round's) compute the base model's features once."""
    from storyengine.learning import reward as reward_module

    first = RewardModel.train(tiny_model, cat_world(8, seed=6))
    second = RewardModel.train(tiny_model, cat_world(8, seed=7))
    texts = [CAT[0], NO_CAT[0], CAT[1], NO_CAT[0]]  # one text twice
    prompts = [PROMPT] * 4
    memo: dict = {}
    assert first.score(prompts, texts, memo=memo) == pytest.approx(first.score(prompts, texts))
    assert len(memo) == 3
    computed = []
    real = reward_module.continuation_features

    def counting(base, spec, prompts, continuations, batch_size=16):
        computed.extend(continuations)
        return real(base, spec, prompts, continuations, batch_size=batch_size)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reward_module, "continuation_features", counting)
        again = second.score(prompts, texts, memo=memo)
        assert computed == []
        assert second.score([PROMPT], ["A new one."], memo=memo)
        assert computed == ["A new one."]
    assert again == pytest.approx(second.score(prompts, texts))
