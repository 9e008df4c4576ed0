"""Streaming voice activity detection: Silero VAD probabilities and the turn segmenter.

Weights: Silero VAD v6 as ONNX, the copy bundled inside faster-whisper (``faster_whisper/assets/
silero_vad_v6.onnx``), run with onnxruntime. The ``silero-vad`` PyPI package ships the same v6
weights but declares a hard dependency on torch, which this server never imports; taking the copy
that our decoder dependency already installs keeps torch (0.7-5 GB) out of the install entirely.

The segmenter is pure logic over per-frame probabilities so it can be tested with scripted
probabilities and no model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from stream_server.crosstalk import frame_levels
from stream_server.profiling import StageProfile

FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame that Silero v6 expects in front of each frame


def bundled_silero_path() -> str:
    import faster_whisper

    return os.path.join(os.path.dirname(faster_whisper.__file__), "assets", "silero_vad_v6.onnx")


class VadModel(Protocol):
    """Frame-probability model; ``state`` is opaque and owned by one audio channel."""

    def new_state(self) -> object: ...

    def probabilities(self, frames: np.ndarray, state: object) -> tuple[np.ndarray, object]: ...


# Silero's LSTM state drifts through a long silence (its cell state keeps growing on zeros and on
# -66 dBFS noise alike), and the model then hears the start of speech late: over 40 read clips the
# first frame at 0.5 came 0.03 s into the clip (p50) after 0.3 s of zeros, 0.21 s after 30 s (up
# to 0.8 s; docs/benchmarks.md, "Silero after a long silence"). Silero's own tracker knows it
# (snakers4/silero-vad#725; pipecat resets every 5 s). The first words of a call's turn, or of a
# speaker after a long quiet spell, were lost with it. So the state starts afresh after this many
# frames in a row under ``QUIET_PROB`` (2 s): in silence a fresh state costs nothing, and the
# speech that follows is heard as after a short lead. (1 s and 0.5 s read the corpus worse.)
QUIET_FRAMES_BEFORE_RESET = 62
QUIET_PROB = 0.1
# A fresh state (a channel's first frames, or after such a reset) is not run on frames under this
# level (RMS, dBFS): they are silence (probability 0), and the state stays fresh for the speech
# that follows, as a reset would leave it. An open session that hears nothing (a call leg on hold
# or waiting while the other speaks, a muted microphone) then costs no model run. Speech Whisper
# can read is above it; a quiet room's floor may be under it, and is silence too (docs/benchmarks.md,
# "Silence is not run").
SKIP_LEVEL_DB = -60.0
# Speech after skipped frames is run with the last of them in front of it, as a state reset in
# the silence would have heard them: unskipped, the speech found a state that had run 0-2 s of
# silence since its last reset (1 s on average). A state fresh at the speech's first frame heard
# two of 12 turns a frame (0.2 s) late; with 4 to 32 frames, every onset fell on its unskipped
# frame. A short word can turn on it: an isolated "three" after 3 s of zeros peaked at 0.38 / 0.49
# / 0.54 with 8 / 31 / 61 frames, 0.49 unskipped (docs/benchmarks.md, "Silence is not run").
WARMUP_FRAMES = 31


@dataclasses.dataclass
class _SileroState:
    h: np.ndarray
    c: np.ndarray
    context: np.ndarray
    quiet: int = 0  # frames in a row under QUIET_PROB, up to the last frame seen
    fresh: bool = True  # no frame run since the state was made (or reset)
    skipped: np.ndarray | None = None  # the last frames skipped (at most WARMUP_FRAMES + 1), for the warm-up


class SileroVad:
    """Silero v6 over onnxruntime; one InferenceSession is shared by every channel (thread-safe)."""

    def __init__(self, path: str | None = None, *, profile: StageProfile | None = None) -> None:
        import onnxruntime

        if os.environ.get("ORT_DISABLE_TELEMETRY") != "0":
            # The package sets the opt-out before ONNX Runtime starts (``stream_server/__init__``);
            # where a host application started the runtime first, this still stops its events.
            onnxruntime.disable_telemetry_events()
        opts = onnxruntime.SessionOptions()
        # One thread: VAD runs inline on the event loop in 0.1 ms steps; thread pools would only
        # add wake-up latency and contend with the decoder for the cores.
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            path or bundled_silero_path(), providers=["CPUExecutionProvider"], sess_options=opts
        )
        self._profile = profile  # CPU per call, measured in the calling thread (see profiling.py)

    def new_state(self) -> _SileroState:
        zeros = np.zeros((1, 1, 128), np.float32)
        return _SileroState(zeros, zeros.copy(), np.zeros(CONTEXT, np.float32))

    def probabilities(self, frames: np.ndarray, state: object) -> tuple[np.ndarray, object]:
        """Speech probability of each 512-sample frame in ``frames`` (shape [n, 512]).

        One ``run`` for all of them: the v6 graph's first input dimension is a sequence that its
        LSTM walks in order, carrying ``h``/``c`` from frame to frame, so the probabilities are
        the same as frame by frame (``test_vad``) while a chunk of n frames pays ONNX Runtime's
        per-call overhead once (0.071 ms for one frame, 0.20 ms for four, 0.37 ms for eight).
        """
        assert isinstance(state, _SileroState)
        if not len(frames):
            return np.empty(0, np.float32), state
        started = self._profile.inline_start() if self._profile is not None else None
        probs, state = self._run(np.asarray(frames, np.float32), state)
        if self._profile is not None and started is not None:
            self._profile.inline_stop("vad", started)
        return probs, state

    def _run(self, frames: np.ndarray, state: _SileroState) -> tuple[np.ndarray, _SileroState]:
        """The frames in blocks of at most ``QUIET_FRAMES_BEFORE_RESET``: where a quiet run
        reaches that length, the frames after it go again from a fresh state (so resets fall on
        the same frames however the audio was chunked, and an hour of silence sent whole reruns
        at most one block per reset, not the whole remainder); a fresh state skips the frames
        under ``SKIP_LEVEL_DB`` in front of it."""
        parts: list[np.ndarray] = []
        while len(frames):
            warm = 0
            if state.fresh:
                skip = _leading_silence(frames)
                if skip:
                    parts.append(np.zeros(skip, np.float32))
                    kept = frames[max(0, skip - WARMUP_FRAMES - 1) : skip]
                    if state.skipped is not None and len(kept) < WARMUP_FRAMES + 1:
                        kept = np.concatenate([state.skipped, kept])[-(WARMUP_FRAMES + 1) :]
                    state = dataclasses.replace(state, context=frames[skip - 1, -CONTEXT:].copy(), skipped=kept.copy())
                    frames = frames[skip:]
                    continue
                if state.skipped is not None and WARMUP_FRAMES:
                    # Speech after skipped silence: the fresh state first hears the silence just before it.
                    lead = state.skipped
                    warm = len(lead) - 1
                    state = dataclasses.replace(state, context=lead[0, -CONTEXT:].copy())
                    frames = np.concatenate([lead[1:], frames])
            block = frames[: QUIET_FRAMES_BEFORE_RESET + warm]
            out, h, c = self._session.run(None, {"input": _with_context(block, state.context), "h": state.h, "c": state.c})
            probs = np.asarray(out, np.float32).reshape(len(block))
            if warm:
                block, frames, probs = block[warm:], frames[warm:], probs[warm:]
            reset_after, quiet = _quiet_scan(probs, state.quiet)
            if reset_after is None:
                parts.append(probs)
                state = _SileroState(h, c, block[-1, -CONTEXT:].copy(), quiet, fresh=False)
                frames = frames[len(block) :]
            else:
                parts.append(probs[: reset_after + 1])
                state = dataclasses.replace(self.new_state(), context=block[reset_after, -CONTEXT:].copy())
                frames = frames[reset_after + 1 :]
        return np.concatenate(parts), state


def _leading_silence(frames: np.ndarray) -> int:
    """How many leading frames are under ``SKIP_LEVEL_DB`` (levels as the session measures them)."""
    loud = np.flatnonzero(frame_levels(frames) >= SKIP_LEVEL_DB)
    return int(loud[0]) if len(loud) else len(frames)


def _with_context(block: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Each frame of ``block`` behind the last ``CONTEXT`` samples before it (``context``, then
    the frame before's tail): the ``[n, CONTEXT + FRAME]`` input the v6 graph takes."""
    rows = np.empty((len(block), CONTEXT + FRAME), np.float32)
    rows[0, :CONTEXT] = context
    rows[1:, :CONTEXT] = block[:-1, -CONTEXT:]
    rows[:, CONTEXT:] = block
    return rows


def _quiet_scan(probs: np.ndarray, quiet: int) -> tuple[int | None, int]:
    """Counting on from ``quiet`` frames in a row under ``QUIET_PROB``: the index of the frame
    that completes a run of ``QUIET_FRAMES_BEFORE_RESET`` (None: none does), and the run at the
    last frame scanned."""
    for i, prob in enumerate(probs):
        quiet = quiet + 1 if prob < QUIET_PROB else 0
        if quiet >= QUIET_FRAMES_BEFORE_RESET:
            return i, quiet
    return None, quiet


class FreshListener:
    """A second Silero state, started afresh just before a frame that might open a turn, whose
    probabilities count for the turn's start only.

    Silero's state after speech hears the next short word faintly: in the corpus replay, an
    isolated "six" 1.0 s after the clip before it peaked at 0.47 and a "four" had one frame at
    0.53 (no turn, the word lost in every draw), where a fresh state gave 0.62-0.88. Resetting
    the channel's own state sooner in every quiet spell cost more than it gave: turns ran on past
    their pauses (a fresh state hears their tails as speech too; docs/benchmarks.md, "Silero after a long
    silence"). So the channel's state keeps deciding where turns end and pauses fall, and only
    between turns, from a frame its state puts at ``trigger`` or more, a fresh state that has
    heard the ``preroll`` frames before it listens along for ``life`` frames; the segmenter
    gets the higher of the two probabilities. Frames are judged one by one, so the probabilities
    do not depend on how the audio was chunked; a turn start costs one extra run over the
    pre-roll and a few single frames.
    """

    def __init__(self, vad: VadModel, *, trigger: float, preroll: int = 8, life: int = 16) -> None:
        self._vad = vad
        self.trigger = trigger
        self._preroll = preroll
        self._life = life
        self._state: object | None = None
        self._age = 0

    def probability(self, frame: np.ndarray, before: Callable[[], np.ndarray], prob: float, *, between_turns: bool) -> float:
        """The probability the segmenter hears for ``frame``: ``prob`` (the channel's state's),
        or the fresh state's when it is higher between turns. ``before``: the frames before it,
        asked for when a fresh state starts (it hears the last ``preroll`` of them)."""
        if not between_turns or self.trigger <= 0:
            self._state = None
            return prob
        if self._state is None:
            if prob < self.trigger:
                return prob
            state = self._vad.new_state()
            if self._preroll:
                _, state = self._vad.probabilities(before()[-self._preroll :], state)
            self._state, self._age = state, 0
        fresh, self._state = self._vad.probabilities(frame[None, :], self._state)
        self._age += 1
        if self._age >= self._life:
            self._state = None
        return max(prob, float(fresh[0]))


#: Where Silero hears a turn's first syllable late (on 8 kHz μ-law it gave 0.01-0.07 through the
#: first 0.3 s of "imitates" at -24 to -13 dBFS: its onset came 0.81 s after the word began), the
#: turn's audio starts where the level rose instead: the run of frames this far over the
#: channel's noise floor (and over ``LEVEL_ONSET_MIN_DB``) that leads up to the onset, with gaps of
#: at most ``LEVEL_ONSET_GAP_FRAMES`` (the stops between syllables).
LEVEL_ONSET_RISE_DB = 15.0
LEVEL_ONSET_MIN_DB = -55.0
LEVEL_ONSET_GAP_FRAMES = 2
#: Frames before a turn's onset whose levels give the channel's noise floor (4 s), and how many of
#: them must be non-speech for a floor (0.5 s).
NOISE_FLOOR_FRAMES = 125
NOISE_FLOOR_MIN_FRAMES = 16


def level_onset(levels: list[float], onset: int, reach: int) -> int:
    """The first frame of the loud run that leads up to frame ``onset`` of ``levels`` (dBFS per
    frame, oldest first), at most ``reach`` frames back; ``onset`` itself when there is none.

    The noise floor is the 10th percentile of the frames before ``onset``; with fewer than five
    of them there is no floor to rise from, and the onset stands.
    """
    before = levels[max(0, onset - 4 * reach) : onset]
    if len(before) < 5 or reach <= 0:
        return onset
    loud = loud_level(float(np.percentile(before, 10)))
    earliest, gap = onset, 0
    for k in range(onset - 1, max(-1, onset - reach - 1), -1):
        if levels[k] >= loud:
            earliest, gap = k, 0
        else:
            gap += 1
            if gap > LEVEL_ONSET_GAP_FRAMES:
                break
    return earliest


def noise_floor(levels: list[float], probs: list[float], before: int, *, below: float) -> float | None:
    """The channel's noise floor (dBFS) before frame ``before``: the 10th percentile of the levels
    of the last ``NOISE_FLOOR_FRAMES`` frames whose speech probability (``probs``, aligned with
    ``levels``) was under ``below``; None with fewer than ``NOISE_FLOOR_MIN_FRAMES`` of them (a
    stream that starts with speech has no noise to measure yet, and its words are no floor: an
    end rule measured on them took a comma's pause for a turn's end)."""
    start = max(0, before - NOISE_FLOOR_FRAMES)
    quiet = [level for level, prob in zip(levels[start:before], probs[start:before], strict=False) if prob < below]
    return float(np.percentile(quiet, 10)) if len(quiet) >= NOISE_FLOOR_MIN_FRAMES else None


def loud_level(floor: float) -> float:
    """The level (dBFS) from which a frame is heard as sound over a noise floor of ``floor``."""
    return max(floor + LEVEL_ONSET_RISE_DB, LEVEL_ONSET_MIN_DB)


#: A burst of sound (``sound_bursts``): frames at most this far under the loudest of the audio
#: (and over its noise, ``loud_level``), for at least ``BURST_MIN_FRAMES`` (64 ms: a click or a
#: breath is shorter than any word); quiet gaps of up to ``LEVEL_ONSET_GAP_FRAMES`` are inside it.
BURST_BELOW_PEAK_DB = 25.0
BURST_MIN_FRAMES = 2


def sound_bursts(levels: np.ndarray) -> int:
    """How many separate bursts of sound ``levels`` (dBFS per frame of some audio) holds: runs of
    frames over the audio's noise (its 10th percentile, :func:`loud_level`) and within
    ``BURST_BELOW_PEAK_DB`` of its loudest frame, split by more than ``LEVEL_ONSET_GAP_FRAMES``
    quiet frames.

    A word said twice is two bursts with a dip between (pocketsphinx "five five": 11 and 8 frames,
    35 dB down between them); a single spoken digit is one. 0 where the audio is all sound (its
    noise is its speech) or all quiet: nothing can be said of it then.
    """
    if len(levels) == 0:
        return 0
    loud = max(loud_level(float(np.percentile(levels, 10))), float(np.max(levels)) - BURST_BELOW_PEAK_DB)
    bursts, run, gap = 0, 0, 0
    for is_loud in levels >= loud:
        if is_loud:
            run, gap = run + 1, 0
            continue
        gap += 1
        if gap > LEVEL_ONSET_GAP_FRAMES:
            bursts += run >= BURST_MIN_FRAMES
            run = 0
    return bursts + (run >= BURST_MIN_FRAMES)


def quiet_lead(levels: list[float], first_silent: int, floor: float, most: int) -> int:
    """How many frames before frame ``first_silent`` of ``levels`` were already quiet (under
    :func:`loud_level` of ``floor``), counted back from it, at most ``most``; 0 when that frame
    itself is not quiet.

    Silero's probability falls ~0.1 s after a speaker's level does (its LSTM holds the word's
    tail), so the silence that ends a turn began that much earlier than Silero's first silent
    frame (``SessionLimits.level_end_reach_ms``).
    """
    quiet = loud_level(floor)
    if not 0 <= first_silent < len(levels) or levels[first_silent] >= quiet:
        return 0
    lead = 0
    for k in range(first_silent - 1, max(-1, first_silent - most - 1), -1):
        if levels[k] >= quiet:
            break
        lead += 1
    return lead


@dataclasses.dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    # A start needs this many consecutive speech frames (96 ms): single-frame clicks and breaths
    # otherwise open utterances that decode to nothing.
    min_speech_frames: int = 3
    # ... or, for a quiet or short word, this many consecutive frames above the off threshold of
    # which one is above the threshold (Silero's reference iterator starts on one frame above the
    # threshold and keeps a segment held above the off threshold). 0 turns it off.
    min_soft_speech_frames: int = 5

    @property
    def off_threshold(self) -> float:
        # Hysteresis as in Silero's reference iterator: speech continues until prob drops well
        # below the start threshold, so a soft syllable does not end the turn.
        return max(self.threshold - 0.15, 0.01)


@dataclasses.dataclass(frozen=True)
class SpeechStart:
    sample: int  # where the utterance's audio begins (speech onset minus prefix padding)
    onset: int  # the first speech frame


@dataclasses.dataclass(frozen=True)
class SpeechEnd:
    sample: int  # the end of the last speech frame


class TurnSegmenter:
    """Per-frame probabilities in, speech start/end decisions out (audio time in samples)."""

    def __init__(self, params: VadParams, floor: int = 0) -> None:
        self.params = params
        self.in_speech = False
        self._run = 0  # consecutive speech frames while not in speech
        self._soft = 0  # consecutive frames above the off threshold while not in speech
        self._peaked = False  # one of those was above the threshold
        self._silence = 0  # consecutive silent frames while in speech
        self._last_speech_end = 0
        self._lead = 0  # silent frames before the current pause's first one (``push``'s lead)
        self._floor = floor  # padding never reaches back before this sample (last utterance end)

    @property
    def floor(self) -> int:
        """The earliest sample a new turn's audio may start at (the last turn's end)."""
        return self._floor

    def reset(self, floor: int) -> None:
        self.in_speech = False
        self._run = self._soft = 0
        self._peaked = False
        self._silence = 0
        self._floor = floor

    def force_start(self, sample: int) -> None:
        """Continue in speech from ``sample`` (after a commit or a split inside speech)."""
        self.in_speech = True
        self._silence = 0
        self._last_speech_end = sample

    def pause_begins(self, prob: float) -> bool:
        """Whether a frame of probability ``prob`` would be the first frame of a pause in speech."""
        return self.in_speech and not self._silence and prob < self.params.off_threshold

    def push(self, prob: float, frame_start: int, lead: int = 0) -> SpeechStart | SpeechEnd | None:
        """One frame's probability; ``lead``: on a pause's first frame (:meth:`pause_begins`),
        how many frames of silence came before it (``vad.quiet_lead``): they count toward the
        turn's ending silence, not toward the pause the commit policy sees."""
        p = self.params
        frame_end = frame_start + FRAME
        if not self.in_speech:
            self._run = self._run + 1 if prob >= p.threshold else 0
            self._soft = self._soft + 1 if prob >= p.off_threshold else 0
            self._peaked = self._soft > 0 and (self._peaked or prob >= p.threshold)
            if self._run >= p.min_speech_frames:
                run = self._run
            elif self._peaked and 0 < p.min_soft_speech_frames <= self._soft:
                run = self._soft
            else:
                return None
            self.in_speech = True
            self._silence = 0
            self._soft = 0
            self._peaked = False
            onset = frame_end - run * FRAME
            self._last_speech_end = frame_end
            padding = p.prefix_padding_ms * 16
            return SpeechStart(sample=max(self._floor, onset - padding), onset=onset)
        if prob >= p.off_threshold:
            self._silence = 0
            self._last_speech_end = frame_end
            return None
        if not self._silence:
            self._lead = lead
        self._silence += 1
        if self.ending_silence >= p.silence_duration_ms * 16:
            return self._end_turn()
        return None

    def _end_turn(self) -> SpeechEnd:
        self.in_speech = False
        self._run = self._soft = 0
        self._peaked = False
        self._floor = self._last_speech_end
        return SpeechEnd(sample=self._last_speech_end)

    @property
    def ending_silence(self) -> int:
        """The silence that counts toward ending the turn now (with the quiet lead before the
        pause; 0 outside a pause)."""
        return (self._silence + self._lead) * FRAME if self.in_speech and self._silence else 0

    def end_in_pause(self) -> SpeechEnd | None:
        """End the turn now if it is in a pause (someone else took the turn); None otherwise."""
        return self._end_turn() if self.ending_silence else None

    @property
    def pause_start(self) -> int | None:
        """Where the current in-speech pause began (None outside speech or while speech goes on)."""
        return self._last_speech_end if self.in_speech and self._silence else None

    @property
    def silence_samples(self) -> int:
        """How long the current in-speech pause has lasted (0 outside speech)."""
        return self._silence * FRAME if self.in_speech else 0
