"""Checks on decoded text: loops that Whisper's compression ratio cannot see."""

from engine.text import compression_ratio, cut_repetition, has_words, is_repetition_loop


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
