import pytest

from storyengine.errors import InvalidInput
from storyengine.safety import SafetyFilter, neutralize_mentions
from storyengine.text import split_message, split_sentences, trim_to_sentence


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The fox ran. Then it jum", "The fox ran."),
        ('She said, "Hello!" and the', 'She said, "Hello!"'),
        ("Mr. Fox ran home. He sle", "Mr. Fox ran home."),
        ("Is it? Yes! It is... and", "Is it? Yes! It is..."),
        ("no sentence end at al", "no sentence end at"),
        ("word", ""),
        ("", ""),
        ("Done.\n", "Done."),
    ],
)
def test_trim_to_sentence(raw, expected):
    assert trim_to_sentence(raw) == expected


def test_split_sentences_keeps_abbreviations_together():
    assert split_sentences("Dr. Owl came. He sat! Then") == ["Dr. Owl came.", "He sat!", "Then"]


def test_split_message_respects_limit_and_sentences():
    text = " ".join(f"Sentence number {i} is here." for i in range(300))
    chunks = split_message(text, 2000)
    assert len(chunks) > 1
    assert all(len(c) <= 2000 for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == text


def test_split_message_without_spaces_still_splits():
    chunks = split_message("x" * 4500, 2000)
    assert [len(c) for c in chunks] == [2000, 2000, 500]


def test_mentions_are_neutralised():
    text = neutralize_mentions("Hi @everyone and @here, <@123>, <@!45>, <@&6> in <#7>.")
    assert "@everyone" not in text and "@here" not in text
    for raw in ("<@123>", "<@!45>", "<@&6>", "<#7>"):
        assert raw not in text


def test_safety_filter_input_limits_and_control_tokens():
    safety = SafetyFilter(max_input_chars=50, special_tokens=["<|endoftext|>"])
    assert safety.clean_input("Hi <|endoftext|> there<|im_start|>") == "Hi there"
    with pytest.raises(InvalidInput, match="limit is 50"):
        safety.clean_input("x" * 51)
    with pytest.raises(InvalidInput, match="empty"):
        safety.clean_input("<|endoftext|>")


def test_blocklist_masks_whole_words_only():
    safety = SafetyFilter(blocklist=["grim"])
    assert safety.clean_output("A Grim tale, not grimace.") == "A G*** tale, not grimace."
