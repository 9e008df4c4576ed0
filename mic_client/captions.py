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

Several channels (a call recording: agent and customer) are two speakers talking at once, so
each channel keeps its own open utterance, and the one live line shows every channel that has
unfinished text side by side (``agent: ... | customer: ...``, each part cut to its share of the
width) instead of one leg's words overwriting the other's. Final lines then say who spoke and
when: ``[00:03.2] agent: text``. With one channel the output is exactly the single-speaker form.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

CLEAR_LINE = "\r\x1b[K"
"""Carriage return, then erase from the cursor to the end of the line (ANSI EL 0)."""

DIM = "\x1b[2m"
RESET = "\x1b[0m"
ELLIPSIS = "\u2026"
PART_SEPARATOR = " | "
"""Between two channels' parts of the live line."""


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


def speaker_name(channel: int, speaker: Any = None, labels: Sequence[str] | None = None) -> str:
    """Who is talking on ``channel``: the server's ``speaker``, else our label, else ``ch<N>``."""
    if isinstance(speaker, str) and speaker:
        return speaker
    if labels and 0 <= channel < len(labels):
        return labels[channel]
    return f"ch{channel}"


def format_clock(seconds: float) -> str:
    """Audio time for a caption prefix: ``MM:SS.s`` (``H:MM:SS.s`` past an hour)."""
    tenths = max(round(seconds * 10), 0) if seconds == seconds else 0  # NaN: 0
    hours, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    secs, tenth = divmod(rest, 10)
    clock = f"{minutes:02d}:{secs:02d}.{tenth}"
    return f"{hours}:{clock}" if hours else clock


def _channel_of(event: Mapping[str, Any]) -> int:
    channel = event.get("channel")
    return channel if isinstance(channel, int) and not isinstance(channel, bool) and channel >= 0 else 0


@dataclasses.dataclass
class OpenText:
    """One channel's unfinished utterance on screen."""

    item_id: str | None = None
    stable: str = ""  # deltas of the open utterance: never revised
    interim: str = ""  # the tail after the last delta: replaced by each interim event
    speaker: str | None = None  # as the server named the channel


class CaptionRenderer:
    """Feeds on server events (parsed JSON dicts) and returns the terminal output for each.

    ``columns`` returns the terminal width at the moment of drawing (a callable, so window resizes
    are picked up); ``None`` means "do not cut the line". ``color`` adds the dim style to interim
    text in live mode. ``channels`` above 1 switches to the several-speakers form (see the module
    docstring); ``labels`` names the channels when the server does not (it echoes them as
    ``speaker``).
    """

    def __init__(
        self,
        *,
        live: bool,
        columns: Callable[[], int] | None = None,
        color: bool = True,
        channels: int = 1,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.live = live
        self.columns = columns
        self.color = color
        self.channels = channels
        self.labels = list(labels) if labels else None
        self._open: dict[int, OpenText] = {}
        self._drawn: str | None = None  # what the live line currently shows (None: no live line)

    # -- public API ------------------------------------------------------------------------------

    @property
    def multichannel(self) -> bool:
        return self.channels > 1

    @property
    def line_visible(self) -> bool:
        """Whether a live (unfinished) caption line is on the screen right now."""
        return self._drawn is not None

    def feed(self, event: Mapping[str, Any]) -> str:
        """The text to write for one event ("" when the screen does not change)."""
        kind = event.get("type")
        if kind == "transcript.text.delta":
            state = self._enter(event)
            delta = str(event.get("delta") or "")
            state.stable += delta
            state.interim = _drop_prefix_words(state.interim, delta)
            return self._redraw()
        if kind == "transcript.text.interim":
            state = self._enter(event)
            state.interim = str(event.get("text") or "")
            return self._redraw()
        if kind == "transcript.segment":
            self._open.pop(_channel_of(event), None)
            return self._final_line(event)
        if kind == "input_audio_buffer.cleared":
            # The server closes the kept text with a segment; the interim tail is gone for good.
            for state in self._open.values():
                state.interim = ""
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
        self._open.clear()
        if not self.live or self._drawn is None:
            return ""
        self._drawn = None
        return (RESET if self.color else "") + "\n"

    # -- internals -------------------------------------------------------------------------------

    def _enter(self, event: Mapping[str, Any]) -> OpenText:
        # Each utterance has its own item id; text of a new one must not be glued to the last.
        item_id = event.get("item_id")
        item = None if item_id is None else str(item_id)
        channel = _channel_of(event)
        state = self._open.get(channel)
        if state is None or state.item_id != item:
            state = self._open[channel] = OpenText(item_id=item)
        speaker = event.get("speaker")
        if isinstance(speaker, str) and speaker:
            state.speaker = speaker
        return state

    def _final_line(self, event: Mapping[str, Any]) -> str:
        text = str(event.get("text") or "").strip()
        if text and self.multichannel:
            channel = _channel_of(event)
            who = speaker_name(channel, event.get("speaker"), self.labels)
            start = event.get("start")
            when = format_clock(float(start)) if isinstance(start, (int, float)) else "--:--.-"
            text = f"[{when}] {who}: {text}"
        if not self.live:
            return f"{text}\n" if text else ""
        prefix = CLEAR_LINE if self._drawn is not None else ""
        self._drawn = None
        # Another channel may still be talking: its live text comes back below the final line.
        return prefix + (f"{text}\n" if text else "") + self._redraw()

    def _redraw(self) -> str:
        if not self.live:
            return ""
        screen = self._screen()
        if not screen and self._drawn is None:
            return ""
        if screen == self._drawn:
            return ""
        self._drawn = screen
        return CLEAR_LINE + screen

    def _room(self) -> int | None:
        # One column stays free: writing into the last column makes some terminals wrap.
        return None if self.columns is None else max(self.columns() - 1, 2)

    def _screen(self) -> str:
        """The live line for every channel with unfinished text."""
        if not self.multichannel:
            state = self._open.get(0) or next(iter(self._open.values()), OpenText())
            return self._styled(state.stable.strip(), state.interim.strip(), self._room())
        parts = [
            (channel, state)
            for channel, state in sorted(self._open.items())
            if join_words(state.stable, state.interim)
        ]
        if not parts:
            return ""
        room = self._room()
        share = None
        if room is not None:
            share = max((room - text_width(PART_SEPARATOR) * (len(parts) - 1)) // len(parts), 4)
        drawn = []
        for channel, state in parts:
            label = speaker_name(channel, state.speaker, self.labels) + ": "
            text_room = None if share is None else max(share - text_width(label), 2)
            drawn.append(label + self._styled(state.stable.strip(), state.interim.strip(), text_room))
        return PART_SEPARATOR.join(drawn)

    def _styled(self, stable: str, interim: str, room: int | None) -> str:
        """Caption text in ``room`` columns (newest words kept), the interim part dimmed."""
        plain = join_words(stable, interim)
        shown = plain
        cut = False
        if room is not None and text_width(plain) > room:
            shown, cut = tail_to_width(plain, room - 1)
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
