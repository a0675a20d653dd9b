"""Checks on decoded text: loops that Whisper's compression ratio cannot see, a final that left out
what its interims heard."""

from dataclasses import replace

import pytest

from engine.model import Word
from engine.recognizer import InterimWindow
from engine.text import (
    compression_ratio,
    cut_repetition,
    cut_trailing_repeat,
    dropped_head,
    has_words,
    is_repetition_loop,
)


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


def test_dropped_head_counts_the_heard_words_a_final_leaves_out_at_its_start():
    # What the continuous set's fifth utterance gave: interims heard the first sentence, the
    # final began at the second.
    heard = (
        "She had a dog suit in greasy wash produced the block books which were the immediate "
        "predecessors of the true printed book, The Child Almost Mr. Quilter is the apostle"
    )
    final = "produced the block books which were the immediate predecessors of the true printed book"
    assert dropped_head(heard, final) == 8
    assert dropped_head(heard, "She had your dark suit in greasy wash water all year. " + final) == 0
    # A greedy interim and a beam final disagreeing on the first words is not a dropped head.
    assert (
        dropped_head("As, but you can do for your country.", "country ask what you can do for your country")
        == 0
    )
    assert dropped_head("So my fellow Americans ask not", "Americans ask not") == 0  # 3 words: below the bar
    assert dropped_head("Go forward ten meters", "") == 0  # nothing in common: no evidence of where
    assert dropped_head("", "Go forward ten meters") == 0


def test_the_interim_window_splits_a_final_after_the_words_it_left_out():
    window = InterimWindow(window_seconds=4.0)
    words = "She had your dark suit in greasy wash water all year. Produced the block books".split()
    aligned = [Word(word, 0.3 * i, 0.3 * i + 0.25, 0.9) for i, word in enumerate(words)]

    def interim(first: int, last: int) -> None:
        """An interim of the window (which starts at word ``first``) that heard up to ``last``."""
        offset = window.start
        heard = [replace(w, start=w.start - offset, end=w.end - offset) for w in aligned[first:last]]
        window.update(" ".join(w.word for w in heard), heard)

    interim(0, 8)
    interim(0, 10)  # agrees with the first on 8 words: the window moves past "wash"
    interim(8, 15)  # agrees on "water all" (as far as the one before heard): past "all"
    interim(10, 15)  # agrees on "year. Produced the block": past "block"
    expected = [(aligned[7].end, 8), (aligned[9].end, 10), (aligned[13].end, 14)]
    assert window.moves == [(pytest.approx(end), count) for end, count in expected]
    assert window.transcript == " ".join(words)
    final = "Produced the block books, which were the immediate predecessors"
    # The final left out 11 heard words: the first move past all of them is after "block".
    assert window.head_cut(final) == pytest.approx(aligned[13].end)
    assert window.head_cut("She had your dark suit in greasy wash water all year. " + final) is None
