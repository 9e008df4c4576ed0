"""Crosstalk between the channels of one session: a channel that hears another's speech faintly.

Call-center taps and recordings put each party on a channel of its own, but a channel often
carries the other party too, 20-50 dB down: line echo from a hybrid, acoustic echo from a phone on
speaker, a headset's sidetone, bleed in the recorder. Silero hears speech at any level and Whisper
transcribes it, so every word then appears on both channels. The 8-call replay with each leg
carrying the other 40 ms late read 64.9% WER at -45 dB (462 of its 528 errors insertions), 86.8%
at -35 dB and 96.7% at -25 dB, against 7.9% clean (docs/benchmarks.md, "Echo between the legs").

So a frame of a channel whose level is ``margin_db`` or more under the loudest frame of another
channel within the last ``lookback`` frames (echo arrives up to a few hundred milliseconds after
its source) counts as that channel's speech, and this channel's VAD hears silence there. Two people
who talk at once are each loud on their own channel, within a few dB of each other, so overlapping
speech keeps its frames. Levels are frame energies in dBFS on the session's 16 kHz frame grid,
which every channel shares (frame ``i`` is samples ``[i * FRAME, (i + 1) * FRAME)`` of each).

Pure bookkeeping over levels, no audio kept: the session records each channel's whole frames as
they arrive and asks about a frame when its VAD judges it. A channel that is behind the others
(its audio arrives later) is simply not compared yet: a frame is judged against the frames the
other channels have delivered so far, never held back for them.
"""

from __future__ import annotations

import numpy as np

#: Frames of another channel a frame is compared with: its own and the nine before it (320 ms).
LOOKBACK_FRAMES = 10
#: Levels kept per channel, in frames (10 s): a channel may run this far ahead of another.
KEPT_FRAMES = 313
#: The level of digital silence (dBFS): a floor, so log10 never sees 0.
FLOOR_DB = -120.0


def frame_levels(frames: np.ndarray) -> np.ndarray:
    """The level in dBFS of each row of ``frames`` (one VAD frame per row, samples in [-1, 1])."""
    wide = frames.astype(np.float64)
    power = np.einsum("ij,ij->i", wide, wide) / frames.shape[1]  # mean square: a third of np.mean's time on one frame
    levels: np.ndarray = np.maximum(10.0 * np.log10(np.maximum(power, 1e-30)), FLOOR_DB)
    return levels


class CrosstalkGate:
    """Per-frame levels of each channel, and which frames are another channel's speech.

    ``margin_db`` 0 turns the gate off (and a session of one channel has nothing to compare).
    """

    def __init__(self, channels: int, margin_db: float, *, lookback: int = LOOKBACK_FRAMES) -> None:
        self.margin_db = margin_db
        self._lookback = lookback
        self._levels: list[list[float]] = [[] for _ in range(channels)]
        self._first: list[int] = [0] * channels  # frame index of each list's first level

    @property
    def active(self) -> bool:
        return self.margin_db > 0 and len(self._levels) > 1

    def recorded(self, channel: int) -> int:
        """Frames of ``channel`` recorded so far (the next one's index)."""
        return self._first[channel] + len(self._levels[channel])

    def record(self, channel: int, levels: np.ndarray) -> None:
        """The levels of ``channel``'s next whole frames, in order."""
        kept = self._levels[channel]
        kept.extend(float(v) for v in levels)
        excess = len(kept) - KEPT_FRAMES
        if excess > KEPT_FRAMES:  # trim in bulk, not every frame
            del kept[:excess]
            self._first[channel] += excess

    def levels(self, channel: int, index: int, count: int) -> list[float] | None:
        """The recorded levels of ``channel``'s frames ``index .. index + count - 1`` (None unless
        every one is still kept): the session reads them back for its VAD's frames instead of
        measuring the same frames twice."""
        offset = index - self._first[channel]
        kept = self._levels[channel]
        return kept[offset : offset + count] if offset >= 0 and offset + count <= len(kept) else None

    def _level(self, channel: int, index: int) -> float | None:
        offset = index - self._first[channel]
        kept = self._levels[channel]
        return kept[offset] if 0 <= offset < len(kept) else None

    def heard_from_elsewhere(self, channel: int, index: int) -> bool:
        """Whether frame ``index`` of ``channel`` is another channel's speech heard faintly: its
        level is ``margin_db`` or more under another channel's loudest recorded frame among
        ``index - lookback + 1 .. index``."""
        if not self.active:
            return False
        own = self._level(channel, index)
        if own is None:
            return False
        loudest = FLOOR_DB
        for other in range(len(self._levels)):
            if other == channel:
                continue
            lo = max(index - self._lookback + 1 - self._first[other], 0)
            hi = min(index + 1 - self._first[other], len(self._levels[other]))
            if hi > lo:
                loudest = max(loudest, max(self._levels[other][lo:hi]))
        return loudest - own >= self.margin_db


__all__ = ["KEPT_FRAMES", "LOOKBACK_FRAMES", "CrosstalkGate", "frame_levels"]
