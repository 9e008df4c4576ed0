"""Terminal captions: turns server events into the exact text to write to the terminal.

The renderer is pure -- events in, strings out, no I/O -- so that what a user sees can be tested
byte for byte without a terminal.

Two modes:

* **live** (stdout is a TTY): the open utterance is shown on the current line and redrawn in place
  (carriage return + "erase line") as deltas and interim text arrive; the stable part is drawn
  normally, the interim tail dimmed because it may still change. When the utterance's
  ``transcript.segment`` arrives the line is replaced by the final text and a newline, so finals
  scroll up like a transcript.
* **plain** (stdout is a pipe or a file): only final segments are written, one per line, so
  ``mic-client > notes.txt`` gives a clean transcript without control characters.

The live line is cut to the terminal width (keeping the newest words): "erase line" only clears
one physical row, so a line that wrapped would leave stale rows behind on every redraw.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

CLEAR_LINE = "\r\x1b[K"
"""Carriage return, then erase from the cursor to the end of the line (ANSI EL 0)."""

DIM = "\x1b[2m"
RESET = "\x1b[0m"
ELLIPSIS = "\u2026"


def char_width(ch: str) -> int:
    """Terminal columns a character takes: 2 for East Asian wide/full-width, 0 for combining."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(char_width(ch) for ch in text)


def tail_to_width(text: str, columns: int) -> tuple[str, bool]:
    """The longest suffix of ``text`` that fits in ``columns``; the flag says whether it was cut."""
    if text_width(text) <= columns:
        return text, False
    used = 0
    start = len(text)
    while start > 0:
        w = char_width(text[start - 1])
        if used + w > columns:
            break
        used += w
        start -= 1
    return text[start:], True


def join_words(left: str, right: str) -> str:
    """Join two pieces of caption text with exactly one space between them."""
    left, right = left.strip(), right.strip()
    if left and right:
        return f"{left} {right}"
    return left or right


class CaptionRenderer:
    """Feeds on server events (parsed JSON dicts) and returns the terminal output for each.

    ``columns`` returns the terminal width at the moment of drawing (a callable, so window resizes
    are picked up); ``None`` means "do not cut the line". ``color`` adds the dim style to interim
    text in live mode.
    """

    def __init__(
        self,
        *,
        live: bool,
        columns: Callable[[], int] | None = None,
        color: bool = True,
    ) -> None:
        self.live = live
        self.columns = columns
        self.color = color
        self._item_id: str | None = None
        self._stable = ""  # deltas of the open utterance: never revised
        self._interim = ""  # the tail after the last delta: replaced by each interim event
        self._drawn: str | None = None  # what the live line currently shows (None: no live line)

    # -- public API ------------------------------------------------------------------------------

    @property
    def line_visible(self) -> bool:
        """Whether a live (unfinished) caption line is on the screen right now."""
        return self._drawn is not None

    def feed(self, event: Mapping[str, Any]) -> str:
        """The text to write for one event ("" when the screen does not change)."""
        kind = event.get("type")
        if kind == "transcript.text.delta":
            self._enter(event.get("item_id"))
            delta = str(event.get("delta") or "")
            self._stable += delta
            self._interim = _drop_prefix_words(self._interim, delta)
            return self._redraw()
        if kind == "transcript.text.interim":
            self._enter(event.get("item_id"))
            self._interim = str(event.get("text") or "")
            return self._redraw()
        if kind == "transcript.segment":
            text = str(event.get("text") or "").strip()
            self._reset()
            return self._final_line(text)
        if kind == "input_audio_buffer.cleared":
            # The server closes the kept text with a segment; the interim tail is gone for good.
            self._interim = ""
            return self._redraw()
        if kind == "transcript.text.done":
            return self.finish()
        return ""

    def interrupt(self) -> str:
        """Erase the live line so a message (an error on stderr) can be printed on a clean row.

        Follow the message with :meth:`restore` to draw the live line again.
        """
        if not self.live or self._drawn is None:
            return ""
        self._drawn = None
        return CLEAR_LINE

    def restore(self) -> str:
        """Redraw the live line after :meth:`interrupt`."""
        return self._redraw()

    def finish(self) -> str:
        """Leave the terminal tidy at the end of a session.

        A live line still on screen (the server went away before finalizing it) is kept, not
        erased -- it is all the user got -- and ended with a newline so the shell prompt starts
        on a fresh row.
        """
        if not self.live or self._drawn is None:
            self._reset()
            return ""
        self._reset()
        self._drawn = None
        return (RESET if self.color else "") + "\n"

    # -- internals -------------------------------------------------------------------------------

    def _enter(self, item_id: Any) -> None:
        # Each utterance has its own item id; text of a new one must not be glued to the last.
        item = None if item_id is None else str(item_id)
        if item != self._item_id:
            self._item_id = item
            self._stable = ""
            self._interim = ""

    def _reset(self) -> None:
        self._item_id = None
        self._stable = ""
        self._interim = ""

    def _final_line(self, text: str) -> str:
        if not self.live:
            return f"{text}\n" if text else ""
        prefix = CLEAR_LINE if self._drawn is not None else ""
        self._drawn = None
        if not text:
            return prefix
        return f"{prefix}{text}\n"

    def _redraw(self) -> str:
        if not self.live:
            return ""
        stable = self._stable.strip()
        interim = self._interim.strip()
        plain = join_words(stable, interim)
        if not plain and self._drawn is None:
            return ""
        screen = self._styled(stable, interim, plain)
        if screen == self._drawn:
            return ""
        self._drawn = screen
        return CLEAR_LINE + screen

    def _styled(self, stable: str, interim: str, plain: str) -> str:
        """The live line: cut to the terminal width (newest words kept), interim part dimmed."""
        shown = plain
        cut = False
        if self.columns is not None:
            # One column stays free: writing into the last column makes some terminals wrap.
            room = max(self.columns() - 1, 2)
            shown, cut = tail_to_width(plain, room - 1) if text_width(plain) > room else (plain, False)
        # Where the interim part starts inside ``shown`` (it is always the end of ``plain``); the
        # separating space stays with the stable part.
        split = max(len(shown) - len(interim), 0)
        head, tail = shown[:split], shown[split:]
        prefix = ELLIPSIS if cut else ""
        if self.color and tail:
            return f"{prefix}{head}{DIM}{tail}{RESET}"
        return f"{prefix}{head}{tail}"


def _drop_prefix_words(interim: str, delta: str) -> str:
    """Remove the words of a new delta from the front of the current interim text.

    The interim is "the tail after the last delta"; when a delta commits words, the interim shown
    so far usually starts with those same words until the server's next interim arrives. Dropping
    them avoids showing them twice for a moment. If the interim does not start with the delta's
    words the two disagree, and the stale interim is dropped whole.
    """
    delta_words = delta.split()
    interim_words = interim.split()
    if not delta_words:
        return interim
    if interim_words[: len(delta_words)] == delta_words:
        return " ".join(interim_words[len(delta_words) :])
    return ""
