"""The model runner: a row scores as its prompt alone would, whoever joins or leaves the
batch beside it, and a group's rows share one prefill, then go their own ways."""

from dataclasses import dataclass, field

import pytest
import torch

from storyengine.serving.generation import BASE_ADAPTER
from storyengine.serving.runner import ModelRunner

TEXT = (
    "Once upon a time there was a little girl named Lily. She loved to play outside in the "
    "sun with her dog. One day they found a big red ball in the garden."
)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def alone(model, prompt: list[int], adapter: str, steps: int) -> tuple[list[int], list]:
    """`prompt` decoded greedily for `steps` steps on a runner of its own: the tokens
    it wrote and the scores after the prompt and after each of them."""
    runner = ModelRunner(model)
    first = runner.prefill(prompt, adapter)
    runner.join([first])
    tokens, scores = list(prompt), [first.logits[0]]
    for _ in range(steps):
        tokens.append(int(scores[-1].argmax()))
        scores.append(runner.decode([tokens[-1]], [len(tokens) - 1], [adapter])[0])
    return tokens[len(prompt) :], scores


@dataclass
class Row:
    prompt: int
    """Which prompt it continues."""
    tokens: list[int]
    scores: list = field(default_factory=list)


@pytest.mark.parametrize("which", ["tiny", "tiny_lora"])
@torch.inference_mode()  # as the scheduler's worker runs it
def test_rows_score_as_alone_whoever_joins_or_leaves(which, tiny_model, tiny_lora_model):
    model = tiny_model if which == "tiny" else tiny_lora_model
    adapters = [BASE_ADAPTER] * 3 if which == "tiny" else ["fox", "owl", BASE_ADAPTER]
    ids = model.encode(TEXT)
    prompts = [ids[:30], ids[3:12], ids[5:22]]
    expected = [alone(model, p, a, steps=6) for p, a in zip(prompts, adapters, strict=True)]
    runner = ModelRunner(model)
    rows: list[Row] = []  # the batch's rows, in the runner's order

    def join(*which_prompts: int) -> None:
        prefilled = [runner.prefill(prompts[i], adapters[i]) for i in which_prompts]
        new = [
            Row(i, list(prompts[i]), [p.logits[0]])
            for i, p in zip(which_prompts, prefilled, strict=True)
        ]
        order = runner.join(prefilled)
        rows[:] = [rows[r] if n is None else new[n] for n, r in order]
        lengths = runner.mask.sum(1).tolist()  # type: ignore[union-attr]
        assert lengths == sorted(lengths, reverse=True)  # longest first
        assert lengths == [len(row.tokens) for row in rows]

    def step() -> None:
        for row in rows:  # the token the prompt wrote alone (no near-tie can diverge)
            written = len(row.tokens) - len(prompts[row.prompt])
            row.tokens.append(expected[row.prompt][0][written])
        logits = runner.decode(
            [row.tokens[-1] for row in rows],
            [len(row.tokens) - 1 for row in rows],
            [adapters[row.prompt] for row in rows],
        )
        for row, scores in zip(rows, logits, strict=True):
            row.scores.append(scores)

    join(0, 1)
    step()
    step()
    join(2)  # joins a batch that has decoded: shorter than one row, longer than the other
    step()
    seen = list(rows)
    runner.retire([i for i, row in enumerate(rows) if row.prompt != 1])
    rows[:] = [row for row in rows if row.prompt != 1]
    for _ in range(3):
        step()
    for row in seen:
        scores = expected[row.prompt][1]
        close(torch.stack(row.scores), torch.stack(scores[: len(row.scores)]))
    assert [len(row.scores) for row in sorted(seen, key=lambda r: r.prompt)] == [7, 4, 5]
    runner.retire([])
    assert runner.cache is None and runner.mask is None


@torch.inference_mode()
def test_a_group_shares_one_prefill_then_its_rows_go_their_own_ways(tiny_model):
    ids = tiny_model.encode(TEXT)
    runner = ModelRunner(tiny_model)
    group = runner.prefill(ids[:20], BASE_ADAPTER, rows=3)
    assert group.logits.shape[0] == 3 and group.length == 20
    assert bool((group.logits == group.logits[0]).all())
    single = runner.prefill(ids[:8], BASE_ADAPTER)
    # Longest first; a group's rows side by side.
    assert runner.join([single, group]) == [(1, 0), (1, 1), (1, 2), (0, 0)]

    def scores_alone(prompt: list[int]) -> torch.Tensor:
        return ModelRunner(tiny_model).prefill(prompt, BASE_ADAPTER).logits[0]

    prompts = [ids[:20], ids[:20], ids[:20], ids[:8]]
    tokens = [5, 6, 7, 8]  # each candidate its own token
    logits = runner.decode(tokens, [20, 20, 20, 8], [BASE_ADAPTER] * 4)
    for row, (prompt, token) in enumerate(zip(prompts, tokens, strict=True)):
        close(logits[row], scores_alone([*prompt, token]))
    assert not torch.equal(logits[0], logits[1])

    runner.retire([1, 3])  # the rows left shift up; the cache keeps their columns
    assert runner.mask is not None and runner.mask.shape == (2, 21)
    logits = runner.decode([9, 10], [21, 9], [BASE_ADAPTER] * 2)
    close(logits[0], scores_alone([*ids[:20], 6, 9]))
    close(logits[1], scores_alone([*ids[:8], 8, 10]))
