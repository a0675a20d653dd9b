"""Checks on decoded text: Whisper's compression ratio, repetition loops, word content.

Whisper's own guard against a looping decode is the gzip compression ratio of its text,
which cannot see a loop in a short text: "S X X X X X X X X X X X" or ". . . . . . . ."
compress too little. Sampling at the higher temperatures of the fallback produces exactly
such texts now and then, with an average log-probability good enough to pass, so every
candidate is also checked for a word or a group of up to four words repeated four times.
"""

from __future__ import annotations

import re
import zlib
from difflib import SequenceMatcher

_NOT_WORD = re.compile(r"[^\w']+")
MAX_REPEATS = 4  # "no, no, no" is speech; the same word four times in a row is a loop
MAX_PERIOD = 4  # longest group of words checked for repetition
MIN_DROPPED_WORDS = 4  # fewer leading words missing is a disagreement, not a dropped sentence


def compression_ratio(text: str) -> float:
    """Whisper's measure: text bytes over their zlib-compressed size."""
    data = text.encode("utf-8")
    return len(data) / max(1, len(zlib.compress(data)))


def word_key(word: str) -> str:
    """A word as compared for repetition and agreement: lower case, no punctuation."""
    return _NOT_WORD.sub("", word.lower())


def has_words(text: str) -> bool:
    """Whether the text holds any word at all (not only punctuation)."""
    return any(word_key(word) for word in text.split())


def find_loop(
    text: str, max_repeats: int = MAX_REPEATS, max_period: int = MAX_PERIOD
) -> tuple[int, int] | None:
    """Where the text starts to loop, as (index in ``text.split()``, words per repetition).

    A loop is one word, or a group of up to ``max_period`` words, said ``max_repeats`` times
    in a row ("s s s s", ". . . .", "s 0 s 0 s 0 s 0"); punctuation-only tokens count as one
    and the same word.
    """
    keys = [word_key(word) for word in text.split()]
    found: tuple[int, int] | None = None
    for period in range(1, max_period + 1):
        needed = period * (max_repeats - 1)  # positions equal to the one a period back
        same = 0
        for index in range(period, len(keys)):
            same = same + 1 if keys[index] == keys[index - period] else 0
            if same >= needed:
                start = index - needed - period + 1
                if found is None or start < found[0]:
                    found = (start, period)
                break
    return found


_REPEATED_MARK = re.compile(r"([^\w\s])\1{3,}")  # one punctuation mark four or more times


def is_repetition_loop(text: str) -> bool:
    """Whether a hypothesis loops (``s s s s s``, ``. . . .``, ``s 0 s 0 s 0``, ``I''''''``)."""
    return find_loop(text) is not None or _REPEATED_MARK.search(text) is not None


def cut_repetition(text: str) -> str:
    """The text before its first loop, plus one repetition of it."""
    text = _REPEATED_MARK.sub(r"\1", text)
    loop = find_loop(text)
    if loop is None:
        return text
    start, period = loop
    return " ".join(text.split()[: start + period])


def cut_trailing_repeat(text: str, min_words: int = 2) -> str:
    """The text without a tail that says again what came just before it.

    Greedy interim decodes of audio that ends mid-speech, padded with silence, often start
    over: "Go forward. Go forward. Go forward." or "She had your dark suit in greasy wash
    water all year. She had your dark su" (the last word may be cut short). Such a tail of at
    least ``min_words`` words, repeating the words one period back, is dropped. Only for
    interims: a final's repetition may be what was said.
    """
    words = text.split()
    keys = [word_key(word) for word in words]
    count = len(keys)
    for start in range(1, count - min_words + 1):  # the earliest cut is the whole repeat
        for period in range(min_words, start + 1):
            origin = start - period
            # A tail shorter than its period repeats part of a phrase: only a restart, from
            # the beginning or from a sentence start, is a repeat ("... for your country"
            # ending like "what your country" began is not).
            restart = origin == 0 or words[origin - 1].endswith((".", "?", "!"))
            if count - start < period and not restart:
                continue
            for index in range(start, count):
                key, earlier = keys[index], keys[index - period]
                if key != earlier and not (index == count - 1 and key and earlier.startswith(key)):
                    break
            else:
                return " ".join(words[:start])
    return text


def dropped_head(heard: str, decoded: str, min_words: int = MIN_DROPPED_WORDS) -> int:
    """How many leading words of ``heard`` (an utterance's interim transcript) ``decoded``
    (its final) leaves out, when the final starts with what was heard after them; else 0.

    tiny.en now and then decodes a long utterance without its first sentence: an 18 s
    utterance of continuous speech came back without "She had your dark suit in greasy wash
    water all year.", which its interims had heard. A few leading words missing (at most
    ``min_words`` - 1) are the usual disagreement of a greedy interim and a beam final.
    """
    heard_words, decoded_words = heard.split(), decoded.split()
    # Punctuation-only "words" get keys of their own, so they match nothing and the indices
    # stay those of ``heard.split()``.
    heard_keys = [word_key(w) or f"\0{i}" for i, w in enumerate(heard_words)]
    decoded_keys = [word_key(w) or f"\1{i}" for i, w in enumerate(decoded_words)]
    blocks = SequenceMatcher(None, heard_keys, decoded_keys, autojunk=False).get_matching_blocks()
    first = next((block for block in blocks if block.size >= 3), None)
    if first is None or first.b > 1 or first.a < min_words:
        return 0
    return first.a


# Words that end in a full stop without ending a sentence.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "vs", "etc", "prof", "no"})
SENTENCE_END = (".", "?", "!", "。", "？", "！")
ONE_LETTER_WORDS = frozenset({"a", "i", "o"})


def ends_sentence(text: str) -> bool:
    """Whether ``text`` ends a sentence: its last word ends in . ? or ! and is neither an
    abbreviation ("Mr.") nor an initial ("J.")."""
    words = text.split()
    if not words or not words[-1].endswith(SENTENCE_END):
        return False
    key = word_key(words[-1])
    return len(key) > 1 and key not in ABBREVIATIONS


def agrees(final: str, heard: str, max_new_words: int, tail_words: int = 4) -> bool:
    """Whether a final's text ends as the interims heard it: of the last ``tail_words`` words
    of ``heard`` before its last (often cut mid-word), all but one are, in order, among the
    last words of ``final``, with at most ``max_new_words`` words after them (spoken after
    that interim). Only the tail is compared, and one word may differ: a greedy interim and a
    beam final often differ in a word ("wash for all" / "wash water all"), which says nothing
    about where the speech ends."""
    final_keys = [word_key(w) for w in final.split() if word_key(w)]
    settled = [word_key(w) for w in heard.split() if word_key(w)][:-1]
    tail = settled[-tail_words:]
    if len(tail) < 2:
        return False
    end = final_keys[-(len(tail) + max_new_words) :]
    matcher = SequenceMatcher(None, tail, end, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) >= len(tail) - 1


def leading_fragments(text: str) -> int:
    """How many words at the start of ``text`` are lone letters that are not words ("S NOT"
    for "ask not" heard from its last sound): an interim that starts inside a word."""
    count = 0
    for word in text.split():
        key = word_key(word)
        if len(key) != 1 or key in ONE_LETTER_WORDS or key.isdigit():
            break
        count += 1
    return count
