"""What a stream has said so far, as the decoder prompt for what it says next.

Offline Whisper conditions every 30 s window on the text before it
(``condition_on_previous_text``); a stream decodes one utterance at a time, so without
this each utterance would be decoded as if it were the first thing ever said. The
session keeps the finals' text here, in utterance order, and every final decode gets its
tail as the prompt (``DecodeRequest.context``; interims only with
``DecodeOptions.interim_context``). Like Whisper, it forgets everything at a final it
cannot trust, so that one bad decode does not propagate through the prompt.
"""

from __future__ import annotations

from .model import Hypothesis

UNRELIABLE_TEMPERATURE = 0.5  # Whisper's prompt_reset_on_temperature
_STYLE_MARKS = frozenset(".,?!;:")


def is_unstyled(text: str) -> bool:
    """Whether a final came out in tiny.en's other style: no capital letter and no punctuation
    ("and so my fellow america" for "And so my fellow Americans."). Without a prompt it decides
    on a style per utterance, and a few samples more or less of the same audio flip it; the
    context then carries that style on to every later final, whose sentence ends early finals
    can no longer see. A punctuated prompt fixed the style but made it say short telephone
    utterances twice."""
    return not any(c.isupper() or c in _STYLE_MARKS for c in text)


def is_reliable(hypothesis: Hypothesis) -> bool:
    """Whether a final's text is fit to condition the next decode on.

    Not when it needed a high sampling temperature (Whisper resets its prompt above 0.5),
    failed every check of the fallback (improbable or repetitive), or repeated itself.
    """
    return (
        hypothesis.temperature <= UNRELIABLE_TEMPERATURE
        and not hypothesis.failed_checks
        and not hypothesis.looped
    )


class SpokenContext:
    """The recent final text of one stream.

    Attributes:
        max_chars: text kept; the model takes at most Whisper's prompt budget (223 tokens,
            about 1000 characters of English) from its end.
    """

    def __init__(self, max_chars: int = 2000) -> None:
        self.max_chars = max_chars
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    def add(self, hypothesis: Hypothesis | None) -> None:
        """Appends a final (in utterance order); ``None`` for a final that failed."""
        if hypothesis is None or not is_reliable(hypothesis):
            self._text = ""
            return
        if hypothesis.is_speech and hypothesis.text and not is_unstyled(hypothesis.text):
            # An unstyled final is left out, not reset to: what was said before still helps.
            text = f"{self._text} {hypothesis.text}".strip()
            if len(text) > self.max_chars:
                text = text[-self.max_chars :].split(" ", 1)[-1]  # whole words only
            self._text = text
