"""The one gate for text coming in and going out (storyengine/safety.py)."""

import re
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storyengine.errors import InvalidInput
from storyengine.safety import (
    SafetyFilter,
    clean_id,
    clean_name,
    neutralize_mentions,
    normalize_text,
    quoted,
)

RAW_MENTION = re.compile(r"@everyone|@here|<@!?\d+>|<@&\d+>|<#\d+>", re.IGNORECASE)


def test_lone_surrogates_become_replacement_characters_and_pairs_are_joined():
    assert normalize_text("a\ud800b") == "a\ufffdb"
    assert normalize_text("\udfff") == "\ufffd"
    assert normalize_text("\ud83d\ude00") == "😀"  # a pair, as UTF-16 would carry it
    with pytest.raises(UnicodeEncodeError):  # what the gate prevents
        "x\ud800".encode()
    normalize_text("x\ud800").encode("utf-8")


def test_nul_and_control_characters_go_newlines_stay():
    assert normalize_text("a\x00b\x07c\x1bd\x7fe\x85f") == "abcdef"
    assert normalize_text("one\r\ntwo\rthree\tfour") == "one\ntwo\nthree four"


def test_clean_input_caps_length_without_echoing_the_text():
    gate = SafetyFilter(max_input_chars=1000)
    with pytest.raises(InvalidInput) as caught:
        gate.clean_input("@everyone " * 10_000 + "!", what="Your line")
    message = str(caught.value)
    assert message == "Your line is 100,001 characters long; the limit is 1,000."
    with pytest.raises(InvalidInput, match="limit is 60"):
        gate.clean_input("x" * 61, limit=60)


def test_clean_input_output_is_storable_in_sqlite():
    gate = SafetyFilter()
    text = gate.clean_input("Ann\x00 found\ud800 a key")
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x TEXT)")
    db.execute("INSERT INTO t VALUES (?)", (text,))  # would raise on a lone surrogate
    assert db.execute("SELECT x FROM t").fetchone()[0] == "Ann found\ufffd a key"


def test_names_and_ids():
    assert clean_name("  Ann\n\x00 the\tBrave ") == "Ann the Brave"
    assert clean_name("") == "someone"
    assert len(clean_name("n" * 500)) == 64
    assert clean_id(12345) == "12345"
    for bad in ("", "two\nlines", "x" * 101):
        with pytest.raises(InvalidInput):
            clean_id(bad, "The channel")


def test_mentions_are_defused_in_every_spelling():
    text = "@everyone @Here <@123> <@!456> <@&789> <#42> </story start:99>"
    assert RAW_MENTION.search(neutralize_mentions(text)) is None
    assert "</story start:\u200b99>" in neutralize_mentions(text)


def test_quoted_shortens_and_defuses():
    shown = quoted("@everyone " + "x" * 200)
    assert len(shown) <= 63 and RAW_MENTION.search(shown) is None  # 60, quotes, a ZWSP


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, min_codepoint=0), max_size=300))
def test_any_text_passes_the_gate_or_is_refused_cleanly(text):
    gate = SafetyFilter(special_tokens=["<|endoftext|>"])
    try:
        cleaned = gate.clean_input(text, required=False)
    except InvalidInput:
        return
    cleaned.encode("utf-8")  # never a lone surrogate
    assert "\x00" not in cleaned and "<|endoftext|>" not in cleaned
    assert RAW_MENTION.search(gate.clean_output(text)) is None
