import pytest

from storyengine.errors import InvalidInput
from storyengine.story.memory import ContextBudget, ContextBuilder, LoreCard, StoryMaterial


@pytest.fixture(scope="module")
def count(bundled_model):
    return bundled_model.count_tokens


def story_turns(n: int) -> list[str]:
    return [
        f"Turn {i}: the little fox walked past tree number {i} and saw something new. "
        f"It was a {['red', 'blue', 'green'][i % 3]} stone that shone in the sun."
        for i in range(n)
    ]


def test_500_turn_story_never_exceeds_the_window(count):
    budget = ContextBudget(window=1024, reserve=120)
    builder = ContextBuilder(count, budget)
    turns = story_turns(500)
    material = StoryMaterial(
        premise="Once upon a time, a fox set out to find the sea.",
        turns=turns,
        genre="fairy tale",
        memory="The fox is called Rusty. He is brave.",
        authors_note="Keep it light and funny.",
        lore=[LoreCard("Owl", ("owl",), "A wise old owl.")],
    )
    for n in (0, 1, 10, 100, 499, 500):
        prompt = builder.build(StoryMaterial(**{**material.__dict__, "turns": turns[:n]}))
        assert prompt.tokens + budget.reserve <= budget.window
        assert count(prompt.text) == prompt.tokens
        # Fixed parts are never cut.
        for fixed in (
            material.premise,
            material.memory,
            "[Author's note: Keep it light and funny.]",
        ):
            assert fixed in prompt.text
        if n:
            assert turns[n - 1] in prompt.text  # the newest turn stays verbatim
    prompt = builder.build(material)
    assert prompt.turns_dropped > 0 and prompt.turns_summarised > 0
    assert turns[0] not in prompt.text  # the oldest are dropped first
    assert prompt.turns_verbatim + prompt.turns_summarised + prompt.turns_dropped == 500


def test_summary_keeps_first_sentences_of_older_turns_in_order(count):
    builder = ContextBuilder(count, ContextBudget(window=400, reserve=60, summary_tokens=120))
    turns = story_turns(40)
    prompt = builder.build(StoryMaterial(premise="A fox story.", turns=turns))
    summary_line = prompt.text.splitlines()[1]
    firsts = [t.split(". ")[0] + "." for t in turns]
    included = [f for f in firsts if f in summary_line]
    assert included, "older turns should be summarised"
    assert included == [f for f in firsts if f in included]  # chronological
    assert turns[-1] in prompt.text


def test_lore_is_inserted_only_when_triggered(count):
    builder = ContextBuilder(count, ContextBudget(window=1024, reserve=80))
    owl = LoreCard("Owl", ("owl", "Hoot"), "A wise old owl who lives in the oak.")
    cat = LoreCard("Cat", ("cat",), "A sleepy cat.")
    quiet = builder.build(StoryMaterial("A fox story.", ["The fox ran home."], lore=[owl, cat]))
    assert "[Owl:" not in quiet.text and quiet.lore_used == []
    loud = builder.build(StoryMaterial("A fox story.", ["Then an OWL flew down."], lore=[owl, cat]))
    assert "[Owl: A wise old owl who lives in the oak.]" in loud.text
    assert loud.lore_used == ["Owl"]
    assert "[Cat:" not in loud.text


def test_lore_respects_its_budget(count):
    builder = ContextBuilder(count, ContextBudget(window=1024, reserve=80, lore_tokens=30))
    cards = [
        LoreCard(f"Owl{i}", ("owl",), "A wise old owl who knows every star by name.")
        for i in range(5)
    ]
    prompt = builder.build(StoryMaterial("A story.", ["The owl hooted."], lore=cards))
    assert 1 <= len(prompt.lore_used) < 5


def test_authors_note_sits_a_few_turns_before_the_end(count):
    builder = ContextBuilder(count, ContextBudget(window=1024, reserve=80, note_depth=3))
    turns = [f"Line {i}." for i in range(8)]
    lines = builder.build(
        StoryMaterial("Premise.", turns, authors_note="Be kind.")
    ).text.splitlines()
    assert lines[-4] == "[Author's note: Be kind.]"
    assert lines[-3:] == ["Line 5.", "Line 6.", "Line 7."]


def test_fixed_parts_that_cannot_fit_are_refused(count):
    builder = ContextBuilder(count, ContextBudget(window=256, reserve=100))
    with pytest.raises(InvalidInput, match="Shorten"):
        builder.build(StoryMaterial("word " * 200, []))


def test_one_huge_turn_is_cut_to_its_end(count):
    builder = ContextBuilder(count, ContextBudget(window=256, reserve=64))
    huge = " ".join(f"Sentence {i} is long enough." for i in range(200))
    prompt = builder.build(StoryMaterial("Premise.", [huge]))
    assert prompt.tokens + 64 <= 256
    assert "Sentence 199 is long enough." in prompt.text
