"""A sample buffer addressed in absolute audio time, with cheap appends and trimming from the front.

Sessions address audio by sample index since the session started; the buffer keeps only the part
still needed (the open utterance plus pre-speech padding), so memory per stream stays bounded no
matter how long the stream runs.
"""

from __future__ import annotations

import numpy as np


class SampleBuffer:
    def __init__(self, capacity: int = 16000 * 4) -> None:
        self._data = np.zeros(capacity, np.float32)
        self._start = 0  # absolute index of _data[0]
        self._len = 0

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        """Absolute index one past the last sample received."""
        return self._start + self._len

    def append(self, samples: np.ndarray) -> None:
        n = len(samples)
        if self._len + n > len(self._data):
            grown = np.zeros(max(2 * len(self._data), self._len + n), np.float32)
            grown[: self._len] = self._data[: self._len]
            self._data = grown
        self._data[self._len : self._len + n] = samples
        self._len += n

    def slice(self, start: int, end: int) -> np.ndarray:
        """A copy of samples [start, end) clipped to what is held (copies: requests outlive trims)."""
        lo = max(start, self._start) - self._start
        hi = min(end, self.end) - self._start
        if hi <= lo:
            return np.zeros(0, np.float32)
        return self._data[lo:hi].copy()

    def trim_before(self, index: int) -> None:
        """Forget samples before ``index``; never forgets samples not yet received."""
        index = min(max(index, self._start), self.end)
        drop = index - self._start
        if drop <= 0:
            return
        keep = self._len - drop
        self._data[:keep] = self._data[drop : self._len]
        self._len = keep
        self._start = index
        # Give memory back after a long utterance so idle streams stay small.
        if len(self._data) > 4 * max(keep, 16000 * 4):
            self._data = self._data[: max(keep * 2, 16000 * 4)].copy()
