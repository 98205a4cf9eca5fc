"""The batch's sampler on hand-made logits: each row picked by its own rules, a seeded
row the same whatever rows are beside it, top-p drawn without sorting the vocabulary."""

from dataclasses import dataclass, field

import torch

from storyengine.sampling import SamplingParams
from storyengine.serving.generation import GenerationRequest
from storyengine.serving.sampler import _sample_rows, sample_next_tokens

EOS = 0
VOCAB = 50


@dataclass
class Row:
    """A row as the sampler reads it (the scheduler's sequences are rows too)."""

    request: GenerationRequest
    tokens: list[int] = field(default_factory=lambda: [1, 2, 3])
    new: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None
    ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seen = torch.tensor(sorted(set(self.tokens)))


def row(seed: int | None = None, min_new: int = 0, **params) -> Row:
    """A row of the prompt [1, 2, 3]: no repetition rule, top-k or top-p unless given."""
    plain = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "top_k": 0, "top_p": 1.0}
    params = SamplingParams(**{**plain, **params})
    request = GenerationRequest([1, 2, 3], params, min_new_tokens=min_new)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return Row(request, generator=generator)


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_their_argmax():
    scores = logits(4)
    tokens = sample_next_tokens([row(temperature=0.0) for _ in range(4)], scores, EOS)
    assert tokens == scores.argmax(-1).tolist()


def test_a_top_k_of_one_samples_the_greedy_token():
    scores = logits(6, seed=1)
    rows = [row(seed=i, temperature=1.3, top_k=1, top_p=1.0) for i in range(6)]
    assert sample_next_tokens(rows, scores, EOS) == scores.argmax(-1).tolist()


def test_a_seeded_row_samples_the_same_whatever_is_beside_it():
    scores = logits(1, seed=2)

    def alone() -> list[int | None]:
        return [sample_next_tokens([row(seed=7, temperature=1.0)], scores, EOS)[0] for _ in "ab"]

    def beside_others() -> int | None:
        others = [row(seed=s, temperature=0.7, top_p=0.5) for s in (1, 2)] + [row(top_k=5)]
        batch = [others[0], row(seed=7, temperature=1.0), *others[1:]]
        mixed = torch.cat([logits(1, seed=3), scores, logits(2, seed=4)])
        return sample_next_tokens(batch, mixed, EOS)[1]

    first, again = alone()
    assert first == again == beside_others()
    draws = {sample_next_tokens([row(seed=s, temperature=1.0)], scores, EOS)[0] for s in range(20)}
    assert len(draws) > 1  # the seed matters: the row does sample


def test_a_row_with_scores_that_are_not_numbers_gets_none_and_the_others_their_token():
    scores = logits(3, seed=5)
    scores[1, 4] = float("nan")
    rows = [row(temperature=0.0), row(temperature=0.0), row(seed=1, temperature=1.0, top_k=1)]
    tokens = sample_next_tokens(rows, scores, EOS)
    assert tokens == [int(scores[0].argmax()), None, int(scores[2].argmax())]


def test_the_end_of_text_waits_for_min_new_tokens_and_a_seen_ngram_is_not_repeated():
    scores = torch.zeros(3, VOCAB)
    scores[:, EOS] = 10.0
    scores[:, 9] = 5.0
    early = row(temperature=0.0, min_new=2)  # no new token yet
    ngram = row(temperature=0.0, no_repeat_ngram_size=2)
    ngram.tokens, ngram.ngrams = [1, 9, EOS, 9], {(9,): {EOS}}  # 9 was followed by EOS
    free = row(temperature=0.0)
    assert sample_next_tokens([early, ngram, free], scores, EOS) == [9, 9, EOS]


def test_the_repetition_penalty_lowers_only_the_tokens_seen():
    scores = torch.zeros(2, VOCAB)
    scores[:, 3] = 2.0  # seen (in the prompt)
    scores[:, 4] = 1.5  # not seen
    rows = [row(temperature=0.0, repetition_penalty=2.0), row(temperature=0.0)]
    assert sample_next_tokens(rows, scores, EOS) == [4, 3]


# -- top-k and top-p, drawn in bulk -------------------------------------------------


def _draws(scores, params, rows=3000):
    """Tokens that `rows` rows with these logits and parameters sample, each row with its
    own seeded generator."""
    seqs = [
        Row(GenerationRequest([1], params), generator=torch.Generator().manual_seed(i))
        for i in range(rows)
    ]
    chosen = [-1] * rows
    _sample_rows(seqs, scores.expand(rows, -1), list(range(rows)), chosen)
    return torch.tensor(chosen)


# Probabilities 0.4, 0.3, 0.2, then 0.1 spread over the rest of the vocabulary.
_PROBS = torch.cat([torch.tensor([0.4, 0.3, 0.2]), torch.full((8189,), 0.1 / 8189)])
_LOGITS = _PROBS.log().unsqueeze(0)


def test_top_p_draws_only_from_the_nucleus_in_its_proportions():
    params = SamplingParams(temperature=1.0, top_p=0.8, top_k=0)
    drawn = _draws(_LOGITS, params)  # the nucleus: 0.4 + 0.3 + 0.2 reaches 0.8 at token 2
    assert set(drawn.tolist()) == {0, 1, 2}
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    torch.testing.assert_close(share, torch.tensor([4 / 9, 3 / 9, 2 / 9]), atol=0.03, rtol=0)


def test_top_k_cuts_before_top_p():
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=2)
    drawn = _draws(_LOGITS, params)
    assert set(drawn.tolist()) == {0, 1}
    assert abs(float((drawn == 0).float().mean()) - 4 / 7) < 0.03


def test_without_a_cut_the_whole_vocabulary_can_be_drawn():
    drawn = _draws(_LOGITS, SamplingParams(temperature=1.0, top_p=1.0, top_k=0))
    assert abs(float((drawn > 2).float().mean()) - 0.1) < 0.02


def test_a_narrow_nucleus_in_a_flat_distribution_is_found_by_sorting():
    """With top-p 0.01 over a nearly flat distribution almost every draw misses the
    nucleus; after NUCLEUS_DRAWS misses the row's tokens are ranked instead."""
    scores = -torch.arange(8192, dtype=torch.float32).unsqueeze(0) * 1e-4  # rank = token id
    probs = scores.softmax(-1)[0]
    nucleus = int(((probs.cumsum(0) - probs) < 0.01).sum())
    drawn = _draws(scores, SamplingParams(temperature=1.0, top_p=0.01, top_k=0), rows=300)
    assert int(drawn.min()) >= 0 and int(drawn.max()) < nucleus  # every row drew
    assert len(set(drawn.tolist())) > nucleus // 2  # spread over the nucleus, not one token
