"""Pairs a round samples for itself while people's are few: continued by the adapter the
round starts from, ranked by the reward model on the bare base model, best over worst."""

import copy
from dataclasses import replace

import pytest

from storyengine.config import Settings
from storyengine.learning.datasets import (
    DatasetConfig,
    FeedbackDatasets,
    LabelledExample,
    PreferencePair,
)
from storyengine.learning.reward import RewardModel
from storyengine.learning.rounds import RoundConfig, plan_round, wants_sampled, with_reward_pairs
from storyengine.learning.sampled_pairs import (
    SampledPairsConfig,
    agreed,
    best_over_worst,
    prompts_to_sample,
    sample_pairs,
)
from storyengine.learning.training import TrainConfig, prepare_policy
from storyengine.sampling import SamplingParams
from storyengine.serving.modeling import LoadedModel
from tests.learning.test_reward import CAT, NO_CAT, PROMPT, cat_world


def label(prompt: str, story: int, generation: int, split: str = "train", liked: bool = False):
    return LabelledExample(
        prompt, f"text {generation}", liked, 1.0 if liked else -1.0, story, split, generation
    )


def pair(prompt: str, story: int, generation: int, source: str = "score", split: str = "train"):
    return PreferencePair(prompt, "a", "b", source, story, split, generation, generation - 1)  # type: ignore[arg-type]


def test_the_best_over_the_worst_when_far_enough_apart():
    config = DatasetConfig(on_policy_margin=1.0, on_policy_weight=0.5)
    prompts = [("P1", 1), ("P2", 2), ("P3", 3), ("P4", 4)]
    candidates = [["a", "b", "c"], ["d", "e", "f"], ["same", "same ", "x"], ["g", "", "h"]]
    scores = [[0.0, 2.0, -0.5], [0.0, 0.5, -0.4], [3.0, -3.0, 0.0], [1.0, -2.0, 0.0]]
    made = best_over_worst(prompts, candidates, scores, config)
    # P2's are 0.9 apart; P3's best and worst are one text; P4's worst is empty.
    assert [(p.prompt, p.chosen, p.rejected) for p in made] == [("P1", "b", "c")]
    (p,) = made
    assert (p.source, p.split, p.weight, p.story_id) == ("reward", "train", 0.5, 1)


def test_the_prompts_continued_are_the_newest_of_the_training_side_and_peoples_only():
    data = FeedbackDatasets(
        pairs=[
            pair("old", 1, 3),
            pair("made", 5, 40, source="reward"),
            pair("held", 6, 50, split="heldout"),
        ],
        examples=[
            label("new", 2, 30),
            label("old", 1, 10),
            label("mid", 3, 20),
            label("held", 6, 60, "heldout"),
        ],
    )
    assert prompts_to_sample(data, 10) == [("new", 2), ("mid", 3), ("old", 1)]
    assert prompts_to_sample(data, 2) == [("new", 2), ("mid", 3)]


def test_a_round_samples_only_while_its_pairs_are_few_and_switches_to_dpo_once_enough():
    data = FeedbackDatasets(
        pairs=[pair(f"P{i}", i, 10 + i) for i in range(3)],
        examples=[label(f"P{i}", i, 20 + i, liked=i % 3 == 0) for i in range(12)],
    )
    config, settings = RoundConfig(), Settings()
    plan = plan_round(config, data)
    assert plan.method == "kto" and len(plan.people_pairs) == 3 and len(plan.sample_from) == 12
    assert wants_sampled(config, plan, settings)
    assert not wants_sampled(replace(config, method="kto"), plan, settings)
    assert not wants_sampled(replace(config, sampled_pairs=None), plan, settings)
    assert not wants_sampled(replace(config, reward_pairs=0), plan, settings)
    few = SampledPairsConfig(while_pairs_below=3)
    assert not wants_sampled(replace(config, sampled_pairs=few), plan, settings)
    greedy = Settings(sampling=SamplingParams(temperature=0))  # n alike candidates
    assert not wants_sampled(config, plan, greedy)

    made = [replace(pair(f"S{i}", 100 + i, 0, source="reward"), weight=0.5) for i in range(8)]
    assert with_reward_pairs(config, plan, [], made[:4]).method == "kto"  # 3 + 4 < 8
    switched = with_reward_pairs(config, plan, [], made)
    assert switched.method == "dpo" and switched.counts["sampled_pairs"] == 8
    assert [r["weight"] for r in switched.rows] == [1.0] * 3 + [0.5] * 8
    assert switched.heldout_examples == plan.heldout_examples  # judged as before
    # At most `reward_pairs` of the reward model's: the served ones by age, then the
    # sampled (the newest).
    served = [
        replace(pair(f"T{i}", 200 + i, 50 + i, source="reward"), weight=0.5) for i in range(4)
    ]
    capped = with_reward_pairs(replace(config, reward_pairs=6), plan, served[::-1], made[:3])
    assert [p.prompt for p in capped.reward_pairs] == ["T1", "T2", "T3", "S0", "S1", "S2"]
    assert capped.counts == {**capped.counts, "reward_pairs": 6, "sampled_pairs": 3}
    # Judged away: an auto round falls back to its labels.
    assert with_reward_pairs(config, switched, []).method == "kto"


def test_candidates_are_ranked_on_the_bare_base_model_not_through_the_adapter(tiny_model):
    """The round's policy wraps the very base model the reward model reads, LoRA layers
    injected; its scores must be the base model's, whatever the adapter writes."""
    import torch

    base = LoadedModel(
        copy.deepcopy(tiny_model.model), tiny_model.tokenizer, "tiny", None, tiny_model.device
    )
    reward = RewardModel.train(base, cat_world(8, seed=11))
    bare = RewardModel(
        LoadedModel(
            copy.deepcopy(tiny_model.model), tiny_model.tokenizer, "tiny", None, tiny_model.device
        ),
        reward.head,
        reward.spec,
        reward.info,
    )
    policy = prepare_policy(base.model, None, TrainConfig(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)  # an adapter that changes the hidden states a lot
    prompts = [
        (PROMPT.replace("Lily", name), i)
        for i, name in enumerate(["Lily", "Tom", "Mia", "Ben", "Sue", "Max"])
    ]

    def sample():
        return sample_pairs(
            policy,
            tiny_model.tokenizer,
            "default",
            reward,
            prompts,
            SampledPairsConfig(candidates=4, max_new_tokens=12),
            SamplingParams(max_new_tokens=12),
            DatasetConfig(on_policy_margin=0.0),
            polish=str.strip,
            max_prompt_tokens=200,
            seed=3,
        )

    made = sample()
    assert made, "six prompts, four candidates each: some differ in score"
    for p in made:
        chosen, rejected = bare.score([p.prompt] * 2, [p.chosen, p.rejected])
        assert chosen > rejected, p
    again = sample()  # sampling is seeded: the same pairs
    assert again == made


def test_its_config_says_what_is_wrong():
    with pytest.raises(ValueError, match="candidates"):
        SampledPairsConfig(candidates=1)


def test_served_pairs_are_kept_where_the_judge_agrees(tiny_model):
    judge = RewardModel.train(tiny_model, cat_world(8, seed=12))
    texts = [CAT[0], NO_CAT[0], CAT[1], NO_CAT[1]]
    a, b, c, d = judge.score([PROMPT] * 4, texts)
    pairs = [
        PreferencePair(PROMPT, CAT[0], NO_CAT[0], "reward", 1, "train", 2, 3, 0.5),
        PreferencePair(PROMPT, NO_CAT[1], CAT[1], "reward", 1, "train", 4, 5, 0.5),
    ]
    kept = agreed(judge, pairs, DatasetConfig(on_policy_margin=0.0))
    assert kept == [p for p, ok in zip(pairs, (a > b, d > c), strict=True) if ok]
    assert agreed(judge, pairs, DatasetConfig(on_policy_margin=1e9)) == []


def test_an_empty_candidate_is_never_chosen():
    """A candidate that ended at once (empty once polished) scores whatever the head
    says of an end-of-text token: it must not teach the adapter to stop."""
    config = DatasetConfig(on_policy_margin=0.5)
    made = best_over_worst([("P", 1)], [["", "a", "b"]], [[9.0, 1.0, 0.0]], config)
    assert [(p.chosen, p.rejected) for p in made] == [("a", "b")]
    assert best_over_worst([("P", 1)], [["", " ", "b"]], [[9.0, 1.0, 0.0]], config) == []
