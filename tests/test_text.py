"""Checks on decoded text: loops that Whisper's compression ratio cannot see."""

import pytest

from engine.text import compression_ratio, cut_repetition, cut_trailing_repeat, has_words, is_repetition_loop


def test_looping_hypotheses_are_recognised_and_cut():
    assert is_repetition_loop("s s s s s s s s s")
    assert is_repetition_loop("And so, so so so so")
    assert not is_repetition_loop("And so my fellow Americans")
    assert not is_repetition_loop("no, no, no")  # three is still speech
    # The garbage finals temperature sampling produced: short, so compression cannot see them.
    assert is_repetition_loop("S X X X X X X X X X X X")
    assert is_repetition_loop("S . . . . . . . . . . .") and is_repetition_loop("... ... ... ...")
    assert cut_repetition("S X X X X X X X X X X X") == "S X"
    assert cut_repetition("S 0 s 0 s 0 s 0 s 0 s s") == "S 0"
    assert not is_repetition_loop("I said, I said, I said")
    assert cut_repetition("Ask not!") == "Ask not!"
    assert is_repetition_loop("I'''''''''''") and cut_repetition("I'''''''''''") == "I'"
    assert not is_repetition_loop("Wait... what?")
    assert not has_words(". . . .") and has_words("Ask not!")


def test_compression_ratio_flags_long_loops_only():
    assert compression_ratio("the the the the the the the the the the the the the the the the") > 2.4
    assert compression_ratio("S X X X X X X X X X X X") < 2.4  # why the loop check exists


@pytest.mark.parametrize(
    "text, shown",
    [
        # Interims of ../shared/audio that started over at the end of their audio:
        ("Go forward. Go forward. Go forward.", "Go forward."),
        ("Printing in the only sense. Printing in the only sense. Printing", "Printing in the only sense."),
        (
            "She had your dog suit in greasy wash for all year. She had your dog su",
            "She had your dog suit in greasy wash for all year.",
        ),
        (
            "produced The Block Books, produced The Block Books, produced The Block",
            "produced The Block Books,",
        ),
        ("It works. It works fine. It works", "It works. It works fine."),
        # Repetitions that are speech, or not a restart, stay:
        ("no no no", "no no no"),
        ("1 1", "1 1"),
        ("I think I think we should go", "I think I think we should go"),
        (
            "ask not what your country can do for you ask what you can do for your country",
            "ask not what your country can do for you ask what you can do for your country",
        ),
    ],
)
def test_an_interim_that_starts_over_is_shown_without_the_repeat(text, shown):
    assert cut_trailing_repeat(text) == shown
