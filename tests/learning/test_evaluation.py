"""The evaluation gate."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from storyengine.learning.datasets import LabelledExample, PreferencePair
from storyengine.learning.evaluation import (
    GateConfig,
    current_better_share,
    decide,
    perplexity,
    preference_accuracy,
    ranked_above,
    repetition,
    sample_continuations,
    sample_each,
)
from storyengine.learning.training import TrainConfig, prepare_policy, train_adapter
from storyengine.sampling import SamplingParams

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play in the park "
    "with her red ball. One day, the ball rolled into the pond and a duck brought it back."
)


def test_repetition_and_distinct2():
    repeat4, distinct2 = repetition(["a b c d a b c d", "x y z"])
    assert repeat4 == pytest.approx(1 / 5)  # five 4-grams in the first text, one a repeat
    assert distinct2 == pytest.approx(6 / 9)


def test_decide_names_every_reason():
    ok = decide(
        GateConfig(), accuracy=0.7, current_accuracy=0.6, ppl=10.2, current_ppl=10.0, base_ppl=10.0
    )
    assert ok.passed and ok.reasons == ()
    bad = decide(
        GateConfig(),
        accuracy=0.6,
        current_accuracy=0.6,
        ppl=11.0,
        current_ppl=10.0,
        base_ppl=10.0,
        samples=(["a b c d a b c d"], ["a b c d e f g h"]),
    )
    assert not bad.passed
    assert len(bad.reasons) == 5  # accuracy, ppl vs current, ppl vs base, repetition, distinct-2


def test_perplexity_in_batches_is_perplexity_one_text_at_a_time(tiny_lora_model):
    model, tok = tiny_lora_model.model, tiny_lora_model.tokenizer
    texts = [STORY, "A short one.", STORY[:60], "x"]  # "x": one token, nothing to predict
    assert len(tok("x")["input_ids"]) == 1
    for adapter in (None, "fox"):
        together = perplexity(model, tok, adapter, texts, batch_size=3)
        nll = count = 0.0
        for text in texts[:3]:
            ids = tok(text)["input_ids"]
            nll += math.log(perplexity(model, tok, adapter, [text])) * (len(ids) - 1)
            count += len(ids) - 1
        assert together == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert perplexity(model, tok, "fox", texts) != pytest.approx(
        perplexity(model, tok, None, texts)
    )


def test_a_candidate_below_the_base_model_is_refused_only_on_evidence():
    """Against the base model too: at round 1 of a server, the held-out side holds a
    handful of 👍, and a candidate at 0.36 may be as good as the base model or better
    (seen: refused twice on that, the round after promoted and +15 points)."""
    common = {"accuracy": 0.36, "current_accuracy": 0.5, "ppl": 10.0, "current_ppl": 10.0}
    unsure = decide(GateConfig(), **common, base_ppl=10.0, current_better=0.8, base_better=0.8)
    assert unsure.passed and unsure.base_better == 0.8
    sure = decide(GateConfig(), **common, base_ppl=10.0, current_better=0.97, base_better=0.97)
    assert sure.reasons == (
        "preference accuracy 0.360 does not beat the base model's 0.500 (the base model"
        " ranks held-out feedback better in 97% of resamples of the held-out stories)",
    )


def test_the_base_model_must_be_beaten_when_not_measured():
    report = decide(
        GateConfig(),
        accuracy=0.48,
        current_accuracy=0.6,
        ppl=10.0,
        current_ppl=10.0,
        base_ppl=10.0,
        current_better=0.6,
    )
    assert not report.passed and report.reasons == (
        "preference accuracy 0.480 does not beat the base model's 0.500",
    )


def test_a_candidate_the_feedback_cannot_tell_from_the_served_adapter_goes_on():
    """An adapter promoted on a handful of held-out 👍 may have scored high by chance;
    a later candidate (trained from it on more feedback) that scores lower but not
    measurably so replaces it, and one measurably worse does not. Before, any candidate
    under the lucky score was refused, and learning stopped at 50 reactions a round."""
    common = {"accuracy": 0.70, "current_accuracy": 0.93, "ppl": 10.0, "current_ppl": 10.0}
    noisy = decide(GateConfig(), **common, base_ppl=10.0, current_better=0.80)
    assert noisy.passed and noisy.current_better == 0.80
    worse = decide(GateConfig(), **common, base_ppl=10.0, current_better=0.97)
    assert not worse.passed
    assert worse.reasons == (
        "preference accuracy 0.700 does not beat 0.930 (the adapter in service ranks"
        " held-out feedback better in 97% of resamples of the held-out stories)",
    )
    unmeasured = decide(GateConfig(), **common, base_ppl=10.0)  # as before: must beat it
    assert not unmeasured.passed


def _labels(scores: list[tuple[bool, float, float]]):
    """Held-out labels, one story each, and two adapters' rewards of them."""
    examples = [
        LabelledExample(f"P{i}:", f" text {i}.", label, 1.0, i, "heldout", i)
        for i, (label, _, _) in enumerate(scores)
    ]
    first = {(e.prompt, e.completion): s[1] for e, s in zip(examples, scores, strict=True)}
    second = {(e.prompt, e.completion): s[2] for e, s in zip(examples, scores, strict=True)}
    return examples, first, second


def test_current_better_share_grows_with_the_evidence():
    # The served adapter ranks every 👍 first; the candidate misses one 👍 in four.
    def feedback(stories: int):
        return _labels(
            [
                (i % 5 == 0, float(i % 5 == 0) - (i % 20 == 0), float(i % 5 == 0))
                for i in range(stories)
            ]
        )

    few, candidate, current = feedback(20)  # four 👍, one of them missed
    assert 0.5 < current_better_share(candidate, current, [], few) < 0.95
    many, candidate, current = feedback(400)  # eighty 👍, twenty missed
    assert current_better_share(candidate, current, [], many) > 0.99
    # The same rewards: never better (ties count half), whatever the draw.
    assert current_better_share(current, current, [], many) == 0.5
    # The candidate better: the share falls below one half.
    assert current_better_share(current, candidate, [], many) < 0.01


def test_current_better_share_resamples_whole_stories():
    """A story's feedback is drawn together: ten pairs of one story are one piece of
    evidence, not ten (a story of many turns rated alike cannot settle the gate)."""

    def pair(story: int, i: int) -> PreferencePair:
        return PreferencePair(
            f"P{i}:", f" good {i}.", f" bad {i}.", "choice", story, "heldout", 0, 0
        )

    tie = pair(99, 99)  # another story, which both rank right
    one_story = [pair(1, i) for i in range(10)] + [tie]
    spread = [pair(i, i) for i in range(10)] + [tie]
    current = {
        (p.prompt, t): float(t.startswith(" good")) for p in spread for t in (p.chosen, p.rejected)
    }
    candidate = {key: 1.0 - value for key, value in current.items()}  # wrong on all ten
    candidate[(tie.prompt, tie.chosen)], candidate[(tie.prompt, tie.rejected)] = 1.0, 0.0
    assert current_better_share(candidate, current, one_story, []) < 0.95  # 2 stories
    assert current_better_share(candidate, current, spread, []) > 0.99  # 11 stories


def test_current_better_share_has_nothing_to_say_without_spread():
    liked = LabelledExample("P:", " yes.", True, 1.0, 1, "heldout", 1)
    disliked = LabelledExample("Q:", " no.", False, -1.0, 2, "heldout", 2)
    rewards = {("P:", " yes."): 1.0, ("Q:", " no."): 0.0}
    flipped = {("P:", " yes."): 0.0, ("Q:", " no."): 1.0}
    assert (
        current_better_share(flipped, rewards, [], [replace(disliked, story_id=1), liked]) is None
    )
    assert (
        current_better_share(flipped, rewards, [], [disliked, replace(disliked, story_id=3)])
        is None
    )
    # Two stories, one liked and one disliked: only the draws of both are counted.
    assert current_better_share(flipped, rewards, [], [liked, disliked]) == 1.0


def test_a_served_adapter_ranking_better_in_exactly_the_confidence_share_stays():
    report = decide(
        GateConfig(confidence=0.9),
        accuracy=0.7,
        current_accuracy=0.8,
        ppl=10.0,
        current_ppl=10.0,
        base_ppl=10.0,
        current_better=0.9,
    )
    assert not report.passed
    with pytest.raises(ValueError, match="confidence"):
        GateConfig(confidence=0.5)
    with pytest.raises(ValueError, match="resamples"):
        GateConfig(resamples=0)


def scrambled(model, std: float):
    """`model` with a fresh LoRA whose B matrices are random: an adapter that changes the
    model at random."""
    policy = prepare_policy(copy.deepcopy(model), None, TrainConfig())
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, std)
    return policy


@pytest.mark.slow
def test_gate_rejects_an_adapter_that_ruins_perplexity(bundled_model):
    policy = scrambled(bundled_model.model, 0.5)
    tok = bundled_model.tokenizer
    base = perplexity(policy, tok, None, [STORY])
    ruined = perplexity(policy, tok, "default", [STORY])
    assert base < 30 and ruined > 2 * base
    report = decide(
        GateConfig(),
        accuracy=0.9,
        current_accuracy=0.5,
        ppl=ruined,
        current_ppl=base,
        base_ppl=base,
    )
    assert not report.passed and any("perplexity" in r for r in report.reasons)


@pytest.mark.slow
def test_preference_accuracy_rises_after_training(tiny_model):
    liked, disliked = " the cat sat on the warm mat.", " the dog barked at the moon."
    policy = prepare_policy(copy.deepcopy(tiny_model.model), None, TrainConfig())
    train_rows = [{"prompt": f"Tale {i}:", "chosen": liked, "rejected": disliked} for i in range(8)]
    heldout = [
        PreferencePair(f"Other {i}:", liked, disliked, "choice", 1, "heldout", 0, 0)
        for i in range(4)
    ]
    examples = [
        LabelledExample(f"Other {i}:", text, label, 1.0, 1, "heldout", 0)
        for i in range(3)
        for text, label in ((liked, True), (disliked, False))
    ]
    tok = tiny_model.tokenizer
    assert preference_accuracy(policy, tok, None, heldout, examples) == 0.5
    config = TrainConfig(
        method="dpo",
        learning_rate=5e-3,
        epochs=3,
        batch_size=4,
        lora_r=8,
        max_length=64,
        min_examples=4,
    )
    train_adapter(policy, tok, train_rows, config)
    assert preference_accuracy(policy, tok, "default", heldout, examples) > 0.9


def test_preference_accuracy_is_balanced_when_reactions_are_one_sided(tiny_model):
    """An adapter that only lowers everything cannot win when nearly all votes are 👎."""
    policy = scrambled(tiny_model.model, 0.3)
    tok = tiny_model.tokenizer
    examples = [
        LabelledExample("P:", " some text here.", i == 0, 1.0, 1, "heldout", 0) for i in range(20)
    ]
    accuracy = preference_accuracy(policy, tok, "default", [], examples)
    # 19 disliked and 1 liked with the same text: whatever the adapter does to that
    # text, it is right on one class only, so balanced accuracy stays at 0.5.
    assert accuracy == 0.5


def test_ranked_above_counts_couples_and_half_ties():
    assert ranked_above([3.0], [1.0, 2.0]) == 1.0
    assert ranked_above([1.5], [1.0, 2.0]) == 0.5
    assert ranked_above([2.0, 0.0], [2.0, 1.0]) == pytest.approx((1.5 + 0) / 4)


def test_an_adapter_that_lowers_every_continuation_is_judged_by_their_order(monkeypatch):
    """Preference training lowers the likelihood of liked and disliked continuations
    alike; what counts is that liked ones now stand above disliked ones. (The gate used to
    ask for liked ones above zero and disliked ones below, so such an adapter scored 0.5
    and was never promoted.)"""
    from storyengine.learning import training

    def logprobs(model, tokenizer, items, *, adapter, batch_size=16):
        if adapter is None:
            return [-50.0 for _ in items]
        # both lower, the cat less so
        return [-51.0 if "cat" in completion else -53.0 for _, completion in items]

    monkeypatch.setattr(training, "completion_logprobs", logprobs)
    examples = [
        LabelledExample(f"P{i}:", text, label, 1.0, 1, "heldout", 0)
        for i in range(5)
        for text, label in ((" a cat.", True), (" a rock.", False), (" a stone.", False))
    ]
    assert preference_accuracy(None, None, "default", [], examples) == 1.0
    pairs = [PreferencePair("Q:", " a cat.", " a rock.", "choice", 1, "heldout", 0, 0)]
    assert preference_accuracy(None, None, "default", pairs, examples) == 1.0
    assert preference_accuracy(None, None, None, pairs, examples) == 0.5


def test_sampled_continuations_are_per_adapter_and_batch_independent(tiny_lora_model):
    """The gate's samples: each prompt's continuation is what that adapter writes alone
    (left padding in a batch changes nothing), and the adapter matters."""
    model, tok = tiny_lora_model.model, tiny_lora_model.tokenizer
    prompts = ["Once upon a time", "The cat sat on the warm mat and looked at the birds", "Hi"]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    batched = sample_continuations(model, tok, "fox", prompts, greedy)
    alone = [sample_continuations(model, tok, "fox", [p], greedy)[0] for p in prompts]
    assert batched == alone
    assert all(batched)
    base = sample_continuations(model, tok, None, prompts, greedy)
    assert base != batched


def test_sampling_for_the_gate_leaves_the_callers_random_state_alone(tiny_lora_model):
    model, tok = tiny_lora_model.model, tiny_lora_model.tokenizer
    params = SamplingParams(max_new_tokens=6)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = sample_continuations(model, tok, "fox", ["Once upon a time"] * 3, params, seed=5)
    assert torch.equal(torch.rand(3), expected)  # as if nothing had been drawn
    again = sample_continuations(model, tok, "fox", ["Once upon a time"] * 3, params, seed=5)
    assert again == first  # and seeded on its own


def test_a_prompt_asked_in_a_row_shares_its_prefill_and_keeps_each_rows_draw(
    tiny_lora_model, monkeypatch
):
    """Sampled pairs ask each prompt several times in a row: those rows start from one
    prefill, and each still draws what it would at its place in the list alone."""
    from storyengine.serving import scheduler

    real, made = scheduler.BatchingGenerator, []

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(scheduler, "BatchingGenerator", spy)
    model, tok = tiny_lora_model.model, tiny_lora_model.tokenizer
    params = SamplingParams(max_new_tokens=8)
    repeated = sample_continuations(model, tok, "fox", ["Once upon a time"] * 3 + ["Hi"], params)
    encode = tiny_lora_model.encode
    assert made[0].prefilled_tokens == len(encode("Once upon a time")) + len(encode("Hi"))
    assert len(set(repeated[:3])) > 1  # the rows draw apart
    for i in range(3):
        other = ["The end."] * i + ["Once upon a time"]  # the prompt alone, at place i
        assert sample_continuations(model, tok, "fox", other, params)[i] == repeated[i]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    once = sample_continuations(model, tok, "fox", ["Hi"], greedy)
    assert sample_continuations(model, tok, "fox", ["Hi"] * 3, greedy) == once * 3


def test_several_adapters_sampled_in_one_batch_write_what_each_writes_alone(tiny_lora_model):
    """The gate samples the candidate and the adapter in service in one batch: each
    adapter's rows are what it writes alone, from the same draws."""
    model, tok = tiny_lora_model.model, tiny_lora_model.tokenizer
    prompts = ["Once upon a time", "The cat sat on the warm mat", "Hi"]
    params = SamplingParams(max_new_tokens=8)
    fox, base = sample_each(model, tok, ["fox", None], prompts, params, seed=3)
    assert fox == sample_continuations(model, tok, "fox", prompts, params, seed=3)
    assert base == sample_continuations(model, tok, None, prompts, params, seed=3)
    assert fox != base


def test_log_likelihoods_in_batches_equal_one_at_a_time(tiny_lora_model):
    """The gate scores held-out feedback in padded batches: each continuation's
    log-likelihood is what it is alone, with the adapter or without."""
    from storyengine.learning.training import completion_logprob, completion_logprobs

    model, tok = tiny_lora_model.model, tiny_lora_model.tokenizer
    items = [
        ("Once upon a time", " a fox ran."),
        ("The cat sat on the warm mat and looked at the birds", " It slept."),
        ("Hi", " there, little mouse, where are you going today?"),
    ]
    for adapter in ("fox", None):
        batched = completion_logprobs(model, tok, items, adapter=adapter, batch_size=2)
        alone = [completion_logprob(model, tok, p, c, adapter=adapter) for p, c in items]
        assert batched == pytest.approx(alone, abs=1e-4)
