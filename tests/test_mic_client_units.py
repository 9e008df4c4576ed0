"""Unit tests of the mic client's parts that need no server: captions, writers, sources, CLI.

Events are the dicts the server really sends (shapes from protocol.md); audio is real speech from
``../shared/speech`` where a test needs audio (skipped with a reason when the corpus is absent).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from mic_client.audio_source import AudioSourceError, FileSource, iter_file_pcm16, parse_device, same_signal
from mic_client.captions import (
    CLEAR_LINE,
    DIM,
    ELLIPSIS,
    PART_SEPARATOR,
    RESET,
    CaptionRenderer,
    format_clock,
    text_width,
)
from mic_client.client import describe_error, session_config
from mic_client.writers import (
    JsonlWriter,
    SrtWriter,
    format_srt_time,
    infer_format,
    open_writer,
    srt_cue,
)

SPEECH = Path(
    os.environ.get("STREAM_SERVER_SPEECH_DIR", Path(__file__).resolve().parents[2] / "shared" / "speech")
)
REPO = Path(__file__).resolve().parents[1]


def speech_clip(clip_id: str) -> Path:
    path = SPEECH / "audio" / f"{clip_id}.wav"
    if not path.is_file():
        pytest.skip(f"real speech corpus not found at {SPEECH} (needs {path.name})")
    return path


# ------------------------------------------------------------------------------------------------
# A realistic session, as the server sends it (two utterances, interim results on)
# ------------------------------------------------------------------------------------------------


def _lp(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


SESSION_EVENTS: list[dict] = [
    {"type": "session.created", "event_id": "ev_1", "session": {"id": "sess_1", "model": "tiny.en"}},
    {"type": "session.updated", "event_id": "ev_2", "session": {"id": "sess_1", "interim_results": True}},
    {
        "type": "input_audio_buffer.speech_started",
        "event_id": "ev_3",
        "item_id": "item_1",
        "audio_start_ms": 180,
    },
    {"type": "transcript.text.interim", "event_id": "ev_4", "item_id": "item_1", "text": "For the"},
    {
        "type": "transcript.text.interim",
        "event_id": "ev_5",
        "item_id": "item_1",
        "text": "For the twentieth time",
    },
    {
        "type": "transcript.text.delta",
        "event_id": "ev_6",
        "item_id": "item_1",
        "delta": "For the",
        "logprobs": [_lp("For", -0.1), _lp(" the", -0.05)],
    },
    {
        "type": "transcript.text.interim",
        "event_id": "ev_7",
        "item_id": "item_1",
        "text": "twentieth time that evening",
    },
    {
        "type": "input_audio_buffer.speech_stopped",
        "event_id": "ev_8",
        "item_id": "item_1",
        "audio_end_ms": 3100,
    },
    {
        "type": "transcript.text.delta",
        "event_id": "ev_9",
        "item_id": "item_1",
        "delta": " twentieth time that evening the two men shook hands.",
        "logprobs": [_lp(" twentieth", -0.3)],
    },
    {"type": "transcript.text.interim", "event_id": "ev_10", "item_id": "item_1", "text": ""},
    {
        "type": "transcript.segment",
        "event_id": "ev_11",
        "item_id": "item_1",
        "start": 0.18,
        "end": 3.1,
        "text": "For the twentieth time that evening the two men shook hands.",
        "logprobs": None,
        "words": None,
        "avg_logprob": -0.21,
        "no_speech_prob": 0.01,
    },
    {
        "type": "input_audio_buffer.speech_started",
        "event_id": "ev_12",
        "item_id": "item_2",
        "audio_start_ms": 4200,
    },
    {"type": "transcript.text.interim", "event_id": "ev_13", "item_id": "item_2", "text": "Lord, but I'm"},
    {
        "type": "input_audio_buffer.speech_stopped",
        "event_id": "ev_14",
        "item_id": "item_2",
        "audio_end_ms": 6300,
    },
    {
        "type": "transcript.text.delta",
        "event_id": "ev_15",
        "item_id": "item_2",
        "delta": " Lord, but I'm glad to see you again, Phil.",
        "logprobs": None,
    },
    {
        "type": "transcript.segment",
        "event_id": "ev_16",
        "item_id": "item_2",
        "start": 4.2,
        "end": 6.3,
        "text": "Lord, but I'm glad to see you again, Phil.",
        "logprobs": None,
        "words": None,
        "avg_logprob": -0.3,
        "no_speech_prob": 0.02,
    },
    {
        "type": "transcript.text.done",
        "event_id": "ev_17",
        "text": (
            "For the twentieth time that evening the two men shook hands."
            " Lord, but I'm glad to see you again, Phil."
        ),
        "logprobs": None,
        "usage": {"type": "duration", "seconds": 7.0},
    },
]

FINALS = [
    "For the twentieth time that evening the two men shook hands.",
    "Lord, but I'm glad to see you again, Phil.",
]


class Terminal:
    """A minimal terminal: enough of \\r, \\n, ESC[K and SGR to know what the user ends up seeing."""

    _SGR = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self) -> None:
        self.rows: list[str] = [""]
        self.col = 0

    def write(self, text: str) -> None:
        text = self._SGR.sub("", text)
        i = 0
        while i < len(text):
            if text.startswith("\x1b[K", i):
                self.rows[-1] = self.rows[-1][: self.col]
                i += 3
                continue
            ch = text[i]
            assert ch != "\x1b", f"unexpected escape sequence in {text!r}"
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.rows.append("")
                self.col = 0
            else:
                row = self.rows[-1]
                self.rows[-1] = row[: self.col] + ch + row[self.col + 1 :]
                self.col += 1
            i += 1

    @property
    def current(self) -> str:
        return self.rows[-1]


# ------------------------------------------------------------------------------------------------
# Caption renderer
# ------------------------------------------------------------------------------------------------


def test_plain_mode_prints_only_final_lines() -> None:
    renderer = CaptionRenderer(live=False)
    out = "".join(renderer.feed(event) for event in SESSION_EVENTS) + renderer.finish()
    assert out == "".join(f"{line}\n" for line in FINALS)
    assert "\x1b" not in out and "\r" not in out


def test_live_mode_final_screen_is_the_transcript() -> None:
    renderer = CaptionRenderer(live=True, columns=None)
    term = Terminal()
    for event in SESSION_EVENTS:
        term.write(renderer.feed(event))
    term.write(renderer.finish())
    assert term.rows == [*FINALS, ""]
    assert not renderer.line_visible


def test_live_line_shows_stable_text_then_dimmed_interim() -> None:
    renderer = CaptionRenderer(live=True, columns=None, color=True)
    seen: list[str] = []
    term = Terminal()
    for event in SESSION_EVENTS[:8]:
        out = renderer.feed(event)
        term.write(out)
        seen.append(term.current)
        if event["event_id"] == "ev_7":
            # "For the" is committed (normal), the rest is interim (dimmed), each word once.
            assert out == f"{CLEAR_LINE}For the {DIM}twentieth time that evening{RESET}"
    assert seen[3] == "For the"
    assert seen[4] == "For the twentieth time"
    # The delta "For the" must not duplicate the words the interim was already showing.
    assert seen[5] == "For the twentieth time"
    assert seen[6] == "For the twentieth time that evening"
    assert renderer.line_visible


def test_unchanged_line_is_not_redrawn() -> None:
    renderer = CaptionRenderer(live=True)
    first = renderer.feed({"type": "transcript.text.interim", "item_id": "a", "text": "hello there"})
    again = renderer.feed({"type": "transcript.text.interim", "item_id": "a", "text": "hello there"})
    assert first.startswith(CLEAR_LINE)
    assert again == ""


def test_delta_that_disagrees_with_interim_drops_the_stale_interim() -> None:
    renderer = CaptionRenderer(live=True, color=False)
    renderer.feed({"type": "transcript.text.interim", "item_id": "a", "text": "wreck a nice beach"})
    out = renderer.feed({"type": "transcript.text.delta", "item_id": "a", "delta": "recognize speech"})
    assert out == f"{CLEAR_LINE}recognize speech"


def test_new_item_starts_a_fresh_line_state() -> None:
    renderer = CaptionRenderer(live=True, color=False)
    renderer.feed({"type": "transcript.text.delta", "item_id": "a", "delta": "first words"})
    out = renderer.feed({"type": "transcript.text.interim", "item_id": "b", "text": "second"})
    assert out == f"{CLEAR_LINE}second"


def test_empty_segment_clears_the_live_line_without_a_blank_row() -> None:
    renderer = CaptionRenderer(live=True, color=False)
    term = Terminal()
    term.write(renderer.feed({"type": "transcript.text.interim", "item_id": "a", "text": "uh"}))
    term.write(
        renderer.feed(
            {
                "type": "transcript.segment",
                "item_id": "a",
                "start": 0.0,
                "end": 0.4,
                "text": "",
                "logprobs": None,
                "words": None,
                "avg_logprob": 0.0,
                "no_speech_prob": 0.9,
            }
        )
    )
    assert term.rows == [""]
    assert not renderer.line_visible


def test_long_live_line_is_cut_to_the_terminal_width_keeping_the_newest_words() -> None:
    columns = 24
    renderer = CaptionRenderer(live=True, columns=lambda: columns, color=True)
    text = "the earliest book printed with movable types the Gutenberg"
    out = renderer.feed({"type": "transcript.text.interim", "item_id": "a", "text": text})
    visible = re.sub(r"\x1b\[[0-9;]*m", "", out[len(CLEAR_LINE) :])
    assert visible.startswith(ELLIPSIS)
    assert text.endswith(visible[1:])
    assert text_width(visible) == columns - 1  # never the last column: that would wrap
    # Wide characters count two columns each.
    out = renderer.feed({"type": "transcript.text.interim", "item_id": "a", "text": "日本語のテキスト" * 4})
    visible = re.sub(r"\x1b\[[0-9;]*m", "", out[len(CLEAR_LINE) :])
    assert text_width(visible) <= columns - 1


def test_interrupt_and_restore_let_a_message_through_the_live_line() -> None:
    renderer = CaptionRenderer(live=True, color=False)
    renderer.feed({"type": "transcript.text.interim", "item_id": "a", "text": "hello"})
    assert renderer.interrupt() == CLEAR_LINE
    assert not renderer.line_visible
    assert renderer.restore() == f"{CLEAR_LINE}hello"
    assert CaptionRenderer(live=False).interrupt() == ""


def test_finish_keeps_an_unfinalized_line_and_ends_it() -> None:
    renderer = CaptionRenderer(live=True, color=False)
    term = Terminal()
    term.write(renderer.feed({"type": "transcript.text.delta", "item_id": "a", "delta": "cut off"}))
    term.write(renderer.finish())
    assert term.rows == ["cut off", ""]


def test_color_off_writes_no_sgr_sequences() -> None:
    renderer = CaptionRenderer(live=True, color=False)
    out = "".join(renderer.feed(event) for event in SESSION_EVENTS)
    assert "\x1b[2m" not in out and "\x1b[0m" not in out


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, "00:00:00,000"),
        (0.18, "00:00:00,180"),
        (3661.2346, "01:01:01,235"),
        (59.9996, "00:01:00,000"),
        (-1.0, "00:00:00,000"),
        (float("nan"), "00:00:00,000"),
    ],
)
def test_srt_time_format(seconds: float, expected: str) -> None:
    assert format_srt_time(seconds) == expected


def test_srt_cue_never_ends_before_it_starts() -> None:
    assert srt_cue(3, 5.0, 4.0, " hi ") == "3\n00:00:05,000 --> 00:00:05,000\nhi\n\n"


def test_srt_writer_one_cue_per_final_segment() -> None:
    buffer = io.StringIO()
    writer = SrtWriter(buffer)
    empty = {**SESSION_EVENTS[10], "item_id": "item_x", "text": "  "}
    for event in [*SESSION_EVENTS[:11], empty, *SESSION_EVENTS[11:]]:
        writer.write(event, received_at=time.time())
    assert writer.cues == 2
    assert buffer.getvalue() == (
        "1\n00:00:00,180 --> 00:00:03,100\n"
        "For the twentieth time that\nevening the two men shook hands.\n\n"  # subtitle lines of at most 42 characters
        "2\n00:00:04,200 --> 00:00:06,300\n"
        "Lord, but I'm glad to see you again, Phil.\n\n"
    )


def test_jsonl_writer_keeps_every_event_and_adds_received_at(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    writer = open_writer(path)
    assert isinstance(writer, JsonlWriter)
    stamps = [1_700_000_000.0 + i * 0.25 for i in range(len(SESSION_EVENTS))]
    unicode_event = {
        "type": "transcript.text.interim",
        "event_id": "ev_u",
        "item_id": "i",
        "text": "Grüße, 日本",
    }
    for event, stamp in zip([*SESSION_EVENTS, unicode_event], [*stamps, stamps[-1] + 1], strict=True):
        writer.write(event, received_at=stamp)
    writer.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(SESSION_EVENTS) + 1
    for record, event, stamp in zip(records[:-1], SESSION_EVENTS, stamps, strict=True):
        assert record.pop("received_at") == stamp
        assert record == event
    assert records[-1]["text"] == "Grüße, 日本"
    assert "Grüße" in lines[-1]  # written as UTF-8, not \\u escapes


def test_output_format_inference() -> None:
    assert infer_format("a/b.jsonl") == "jsonl"
    assert infer_format("b.SRT") == "srt"
    assert infer_format("b.txt", "srt") == "srt"
    with pytest.raises(ValueError, match="--format"):
        infer_format("b.txt")
    with pytest.raises(ValueError, match="unknown output format"):
        infer_format("b.srt", "vtt")


# ------------------------------------------------------------------------------------------------
# Protocol helpers
# ------------------------------------------------------------------------------------------------


def test_session_config_sends_only_what_differs_from_defaults() -> None:
    assert session_config() == {"interim_results": True}
    assert session_config(prompt="Sweynheim, Pannartz.")["prompt"] == "Sweynheim, Pannartz."
    assert session_config(translate=True)["task"] == "translate" and "task" not in session_config()
    assert session_config(language="de", sample_rate=48000, model="base") == {
        "interim_results": True,
        "language": "de",
        "model": "base",
        "sample_rate": 48000,
    }


def test_describe_error_names_code_message_and_field() -> None:
    line = describe_error(
        {
            "type": "error",
            "event_id": "ev_9",
            "error": {
                "type": "invalid_request_error",
                "code": "invalid_value",
                "message": "must be an ISO-639-1 code",
                "param": "session.language",
            },
        }
    )
    assert line == "server error [invalid_value]: must be an ISO-639-1 code (field: session.language)"
    line = describe_error(
        {
            "type": "error",
            "error": {"type": "server_error", "code": "decode_failed", "message": "boom", "param": None},
        }
    )
    assert line == "server error [decode_failed]: boom [server side]"


def test_parse_device() -> None:
    assert parse_device(None) is None
    assert parse_device("3") == 3
    assert parse_device(" USB Mic ") == "USB Mic"
    assert parse_device("pulse") == "pulse"
    assert parse_device("-1") == -1
    # What int() refuses though isdigit() accepts is a name to match, not a traceback.
    assert parse_device("²") == "²" and parse_device("9" * 5000) == "9" * 5000


# ------------------------------------------------------------------------------------------------
# File source on real speech
# ------------------------------------------------------------------------------------------------


def _wav_samples(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert wav.getframerate() == 16000 and wav.getnchannels() == 1 and wav.getsampwidth() == 2
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


async def _collect(source: FileSource) -> tuple[list[bytes], float]:
    await source.start()
    start = time.monotonic()
    frames = [frame async for frame in source]
    elapsed = time.monotonic() - start
    await source.aclose()
    return frames, elapsed


def test_file_source_16k_wav_is_passed_through_sample_exact() -> None:
    path = speech_clip("ljspeech_LJ001-0002")
    frames, elapsed = asyncio.run(_collect(FileSource(path, speed=0, frame_ms=40)))
    assert all(len(frame) == 1280 for frame in frames[:-1])  # 40 ms of pcm16 at 16 kHz
    assert 0 < len(frames[-1]) <= 1280
    got = np.frombuffer(b"".join(frames), dtype="<i2")
    np.testing.assert_array_equal(got, _wav_samples(path))
    assert elapsed < 1.0  # speed 0: no pacing


def test_file_source_paces_at_real_time_times_speed() -> None:
    path = speech_clip("ljspeech_LJ001-0002")  # 1.9 s
    duration = len(_wav_samples(path)) / 16000
    _, elapsed = asyncio.run(_collect(FileSource(path, speed=2.0)))
    # The last frame is sent at (n-1) frame durations / speed; allow scheduling slack.
    assert duration / 2 - 0.1 <= elapsed <= duration / 2 + 0.3


def test_file_source_stop_ends_the_stream_early() -> None:
    path = speech_clip("ljspeech_LJ001-0001")  # 9.7 s

    async def run() -> float:
        source = FileSource(path, speed=1.0)
        await source.start()
        asyncio.get_running_loop().call_later(0.3, source.stop)
        sent = 0
        async for frame in source:
            sent += len(frame)
        await source.aclose()
        return sent / 32000

    assert 0.2 < asyncio.run(run()) < 0.6


@pytest.mark.parametrize("suffix", ["mp3", "flac"])
def test_file_source_decodes_and_resamples_compressed_stereo(tmp_path: Path, suffix: str) -> None:
    import av

    path = speech_clip("ljspeech_LJ001-0002")
    reference = _wav_samples(path)
    encoded = tmp_path / f"clip_44k_stereo.{suffix}"
    _encode(reference, encoded, rate=44100)
    got = np.frombuffer(b"".join(iter_file_pcm16(encoded)), dtype="<i2").astype(np.float64)
    # Same duration within the codec's padding (mp3 adds up to ~50 ms of priming/padding).
    assert abs(len(got) - len(reference)) / 16000 < 0.08
    # Same signal: after aligning for the codec delay, strongly correlated with the original.
    ref = reference.astype(np.float64)
    best = max(
        np.corrcoef(ref[: len(ref) - 2000], got[lag : lag + len(ref) - 2000])[0, 1]
        for lag in range(0, 1600, 8)
        if lag + len(ref) - 2000 <= len(got)
    )
    assert best > 0.9, f"decoded {suffix} does not match the source (corr {best:.3f})"
    del av


def _encode(samples: np.ndarray, path: Path, rate: int) -> None:
    """Write 16 kHz mono samples as a stereo file at ``rate`` (PyAV resamples and encodes)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libmp3lame" if path.suffix == ".mp3" else "flac", rate=rate)
        stream.layout = "stereo"
        resampler = av.AudioResampler(format=stream.format.name, layout="stereo", rate=rate)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


# ------------------------------------------------------------------------------------------------
# The command line, as a real subprocess
# ------------------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mic_client", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_connection_refused_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    # No speech needed: the file only has to open (so the failure is the connection's).
    path = tmp_path / "silence.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(bytes(16000))
    url = f"ws://127.0.0.1:{_free_port()}/v1/stream"
    proc = run_cli("--file", str(path), "--url", url)
    assert proc.returncode == 2, proc.stderr
    assert "connection refused" in proc.stderr
    assert url in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_file_exits_1() -> None:
    proc = run_cli("--file", "/nonexistent/clip.wav", "--url", "ws://127.0.0.1:9/v1/stream")
    assert proc.returncode == 1
    assert "audio file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output", "out.txt"], "cannot tell the output format"),
        (["--speed", "2"], "--speed only applies to --file"),
        (["--file", "x.wav", "--speed", "-1"], "must be >= 0"),
        (["--file", "x.wav", "--device", "1"], "--device only applies"),
        (["--format", "srt"], "--format needs --output"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], message: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_help_lists_every_flag() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in (
        "--url",
        "--file",
        "--speed",
        "--language",
        "--device",
        "--output",
        "--format",
        "--list-devices",
        "--channel-labels",
        "--multichannel",
    ):
        assert flag in proc.stdout


# ------------------------------------------------------------------------------------------------
# Several channels: a call recording with one leg per channel
# ------------------------------------------------------------------------------------------------


def _write_wav(path: Path, frames: np.ndarray, rate: int = 16000) -> None:
    """``frames``: int16, shape (n,) or (n, channels)."""
    channels = 1 if frames.ndim == 1 else frames.shape[1]
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(frames.astype("<i2").tobytes())


def _two_legs() -> tuple[np.ndarray, np.ndarray]:
    """Two different real voices, the second starting while the first still speaks."""
    agent = _wav_samples(speech_clip("arctic_slt_arctic_a0003"))
    customer = _wav_samples(speech_clip("arctic_aew_arctic_a0002"))
    n = max(len(agent), 16000 + len(customer))
    left, right = np.zeros(n, "<i2"), np.zeros(n, "<i2")
    left[: len(agent)] = agent
    right[16000 : 16000 + len(customer)] = customer
    return left, right


def test_session_config_announces_channels_and_labels() -> None:
    assert "channels" not in session_config() and "channel_labels" not in session_config()
    config = session_config(channels=2, channel_labels=["agent", "customer"])
    assert config["channels"] == 2 and config["channel_labels"] == ["agent", "customer"]
    assert session_config(channels=2)["channels"] == 2 and "channel_labels" not in session_config(channels=2)


def test_stereo_file_is_streamed_interleaved_sample_exact(tmp_path: Path) -> None:
    left, right = _two_legs()
    path = tmp_path / "call.wav"
    _write_wav(path, np.stack([left, right], axis=1))
    source = FileSource(path, speed=0, frame_ms=40)
    frames, _ = asyncio.run(_collect(source))
    assert source.channels == source.file_channels == 2 and not source.mixed_same_signal
    assert all(len(f) == 2 * 1280 for f in frames[:-1]), "40 ms of both channels per frame"
    got = np.frombuffer(b"".join(frames), dtype="<i2").reshape(-1, 2)
    np.testing.assert_array_equal(got[:, 0], left)
    np.testing.assert_array_equal(got[:, 1], right)
    assert source.sent_seconds == pytest.approx(len(left) / 16000)


@pytest.mark.parametrize("rate", [8000, 6000])
def test_a_telephone_band_file_is_streamed_at_8k_and_says_so(tmp_path: Path, rate: int) -> None:
    """A phone recording goes out at 8 kHz (the server treats such input as a phone line), not
    upsampled to 16 kHz; a file below 8 kHz, which the server does not take, is brought up to it."""
    left, right = _two_legs()
    narrow = np.stack([left[::2], right[::2]], axis=1)  # arctic at 8 kHz (its content is well below 4 kHz)
    path = tmp_path / "call8k.wav"
    _write_wav(path, narrow if rate == 8000 else narrow[: len(narrow) * 3 // 4], rate=rate)
    source = FileSource(path, speed=0, frame_ms=40)
    frames, _ = asyncio.run(_collect(source))
    assert (source.sample_rate, source.channels) == (8000, 2)
    assert all(len(f) == 2 * 640 for f in frames[:-1]), "40 ms of both channels at 8 kHz per frame"
    got = np.frombuffer(b"".join(frames), dtype="<i2").reshape(-1, 2)
    if rate == 8000:
        np.testing.assert_array_equal(got, narrow)
    assert source.sent_seconds == pytest.approx(len(got) / 8000)
    assert session_config(sample_rate=source.sample_rate, channels=2)["sample_rate"] == 8000


def test_stereo_file_at_44k_keeps_its_legs_apart(tmp_path: Path) -> None:
    """Resampled by PyAV with the layout kept: each output channel is its own input channel."""
    left, right = _two_legs()
    path = tmp_path / "call44k.wav"
    up = np.stack([np.interp(np.arange(0, len(x), 16000 / 44100), np.arange(len(x)), x) for x in (left, right)], axis=1)
    _write_wav(path, up.astype("<i2"), rate=44100)
    got = np.frombuffer(b"".join(iter_file_pcm16(path, channels=2)), dtype="<i2").reshape(-1, 2).astype(np.float64)
    n = min(len(got), len(left)) - 200
    assert np.corrcoef(got[:n, 0], left[:n])[0, 1] > 0.95
    assert np.corrcoef(got[:n, 1], right[:n])[0, 1] > 0.95
    assert abs(np.corrcoef(got[:n, 0], got[:n, 1])[0, 1]) < 0.3, "legs did not leak into each other"


def test_same_signal_tells_dual_mono_from_two_legs() -> None:
    left, right = _two_legs()
    assert same_signal(np.stack([left, left], axis=1).tobytes(), 2) is True
    noisy = np.clip(left + np.random.default_rng(1).normal(0, 30, len(left)), -32768, 32767).astype("<i2")
    assert same_signal(np.stack([left, noisy], axis=1).tobytes(), 2) is True, "lossy coding noise is not a second voice"
    assert same_signal(np.stack([left, right], axis=1).tobytes(), 2) is False
    assert same_signal(np.stack([left, np.zeros_like(left)], axis=1).tobytes(), 2) is False, "one leg talking"
    assert same_signal(np.stack([left, -left], axis=1).tobytes(), 2) is False, "opposite phase is two signals"
    assert same_signal(bytes(4 * 16000), 2) is None, "silence says nothing"


@pytest.mark.parametrize(("mode", "channels"), [("auto", 1), ("split", 2), ("mix", 1)])
def test_dual_mono_file_is_streamed_as_mono_unless_split_is_asked(tmp_path: Path, mode: str, channels: int) -> None:
    left, _ = _two_legs()
    path = tmp_path / "dual_mono.wav"
    lead_in = np.zeros(3 * 16000, "<i2")  # silence first: auto must look past it
    samples = np.concatenate([lead_in, left])
    _write_wav(path, np.stack([samples, samples], axis=1))
    source = FileSource(path, speed=0, channel_mode=mode)  # type: ignore[arg-type]
    frames, _ = asyncio.run(_collect(source))
    assert source.channels == channels and source.file_channels == 2
    assert source.mixed_same_signal is (mode == "auto")
    got = np.frombuffer(b"".join(frames), dtype="<i2").reshape(-1, channels)
    assert len(got) == len(samples), "nothing lost or repeated by the look-ahead"
    np.testing.assert_allclose(got[:, 0], samples, atol=1)


def test_mix_mode_mixes_two_legs_into_one(tmp_path: Path) -> None:
    left, right = _two_legs()
    path = tmp_path / "call.wav"
    _write_wav(path, np.stack([left, right], axis=1))
    source = FileSource(path, speed=0, channel_mode="mix")
    frames, _ = asyncio.run(_collect(source))
    got = np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float64)
    assert source.channels == 1 and len(got) == len(left)
    assert np.corrcoef(got, left.astype(np.float64) + right)[0, 1] > 0.99


def test_more_channels_than_a_session_takes_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nine.wav"
    _write_wav(path, np.ones((1600, 9), "<i2"))
    with pytest.raises(AudioSourceError, match="9 channels; a session takes at most 8"):
        asyncio.run(FileSource(path, speed=0, channel_mode="split").start())
    mixed = FileSource(path, speed=0, channel_mode="mix")
    asyncio.run(mixed.start())
    assert mixed.channels == 1


def _utterance(channel: int, speaker: str | None, item: str, start: float, words: list[str]) -> list[dict]:
    """One utterance's events on one channel: interims growing word by word, then its segment."""
    tag = {"channel": channel, "speaker": speaker, "item_id": item}
    events: list[dict] = [{"type": "input_audio_buffer.speech_started", "audio_start_ms": int(start * 1000), **tag}]
    for k in range(1, len(words) + 1):
        events.append({"type": "transcript.text.interim", "text": " ".join(words[:k]), "words": None, **tag})
    events.append({"type": "transcript.text.delta", "delta": " ".join(words), "logprobs": None, "words": None, **tag})
    events.append({"type": "transcript.text.interim", "text": "", "words": None, **tag})
    events.append(
        {"type": "transcript.segment", "start": start, "end": start + len(words) * 0.4, "text": " ".join(words),
         "logprobs": None, "words": None, "avg_logprob": -0.2, "no_speech_prob": 0.01, **tag}
    )
    return events


def _overlapping_call(speakers: tuple[str | None, str | None] = ("agent", "customer")) -> list[dict]:
    """Two legs talking over each other: their events interleave one by one."""
    agent = _utterance(0, speakers[0], "item_a", 0.5, "thank you for calling how can I help".split())
    customer = _utterance(1, speakers[1], "item_b", 1.7, "hi my card was declined".split())
    events = agent[:2]
    for b, a in zip(customer, agent[2:], strict=False):
        events += [b, a]  # the customer's shorter turn ends first, while the agent still talks
    return events + agent[2 + len(customer) :]


def test_multichannel_plain_lines_say_who_spoke_and_when() -> None:
    renderer = CaptionRenderer(live=False, channels=2)
    out = "".join(renderer.feed(e) for e in _overlapping_call()) + renderer.finish()
    assert out.splitlines() == [
        "[00:01.7] customer: hi my card was declined",
        "[00:00.5] agent: thank you for calling how can I help",
    ]
    unnamed = CaptionRenderer(live=False, channels=2)
    lines = "".join(unnamed.feed(e) for e in _overlapping_call((None, None))).splitlines()
    assert [line.split("] ")[1].split(":")[0] for line in lines] == ["ch1", "ch0"]
    labelled = CaptionRenderer(live=False, channels=2, labels=["left", "right"])
    assert "] right: hi" in "".join(labelled.feed(e) for e in _overlapping_call((None, None)))


def test_multichannel_live_line_keeps_each_legs_words_apart() -> None:
    renderer = CaptionRenderer(live=True, columns=None, color=False, channels=2)
    term = Terminal()
    shown: list[str] = []
    for event in _overlapping_call():
        term.write(renderer.feed(event))
        shown.append(term.current)
    both = [row for row in shown if PART_SEPARATOR in row]
    assert both, "while both talk, both are on the live line"
    for row in both:
        agent_part, customer_part = row.split(PART_SEPARATOR)
        assert agent_part.startswith("agent: ") and customer_part.startswith("customer: ")
        assert "thank you for calling how can I help".startswith(agent_part.removeprefix("agent: "))
        assert "hi my card was declined".startswith(customer_part.removeprefix("customer: "))
    # The customer's final line scrolls up; the agent's unfinished words come back below it.
    final_row = term.rows.index("[00:01.7] customer: hi my card was declined")
    assert shown[-1] == "" and term.rows[final_row + 1 :] == ["[00:00.5] agent: thank you for calling how can I help", ""]
    events = _overlapping_call()
    at = next(i for i, e in enumerate(events) if e["type"] == "transcript.segment" and e["channel"] == 1)
    assert shown[at].startswith("agent: thank you") and PART_SEPARATOR not in shown[at]


def test_multichannel_live_line_shares_the_terminal_width() -> None:
    renderer = CaptionRenderer(live=True, columns=lambda: 41, color=True, channels=2)
    term = Terminal()
    for event in _overlapping_call():
        out = renderer.feed(event)
        term.write(out)
        if out:
            assert text_width(re.sub(r"\x1b\[[0-9;]*m", "", term.current)) <= 40
    cut = renderer  # a long pair of parts: each keeps its newest words behind an ellipsis
    for event in _utterance(0, "agent", "item_c", 9.0, ["word"] * 30)[:-3]:
        term.write(cut.feed(event))
    for event in _utterance(1, "customer", "item_d", 9.5, ["other"] * 30)[:-3]:
        term.write(cut.feed(event))
    agent_part, customer_part = term.current.split(PART_SEPARATOR)
    assert agent_part.startswith("agent: " + ELLIPSIS) and customer_part.startswith("customer: " + ELLIPSIS)
    assert text_width(term.current) <= 40


def test_format_clock() -> None:
    assert [format_clock(t) for t in (0, 3.24, 75.25, 3599.96, 3725.0)] == [
        "00:00.0", "00:03.2", "01:15.2", "1:00:00.0", "1:02:05.0",
    ]


def test_multichannel_srt_cues_name_the_speaker_and_end_up_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "call.srt"
    writer = open_writer(path, channels=2, labels=["agent", "customer"])
    for event in _overlapping_call():
        writer.write(event, 0.0)
    mid = path.read_text(encoding="utf-8")
    assert mid.startswith("1\n00:00:01,700 --> 00:00:03,700\ncustomer: hi"), "written as they arrive"
    writer.close()
    cues = path.read_text(encoding="utf-8").strip().split("\n\n")
    assert cues == [
        "1\n00:00:00,500 --> 00:00:03,700\nagent: thank you for\ncalling how can I help",
        "2\n00:00:01,700 --> 00:00:03,700\ncustomer: hi my card was declined",
    ]


def test_multichannel_jsonl_keeps_channel_and_speaker(tmp_path: Path) -> None:
    path = tmp_path / "call.jsonl"
    writer = open_writer(path, channels=2)
    for event in _overlapping_call():
        writer.write(event, 1.5)
    writer.close()
    segments = [json.loads(line) for line in path.read_text().splitlines() if '"transcript.segment"' in line]
    assert [(s["channel"], s["speaker"]) for s in segments] == [(1, "customer"), (0, "agent")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--channel-labels", "a,b"], "--channel-labels only applies to --file"),
        (["--multichannel", "split"], "--multichannel only applies to --file"),
        (["--file", "x.wav", "--channel-labels", "a,,b"], "1-64 characters"),
        (["--file", "x.wav", "--channel-labels", ",".join("abcdefghi")], "at most 8 labels"),
        (["--file", "x.wav", "--channel-labels", "a,b", "--multichannel", "mix"], "mixes them into one"),
    ],
)
def test_cli_channel_usage_errors_exit_2(args: list[str], message: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cli_labels_that_do_not_match_the_files_channels_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    _write_wav(path, np.zeros((16000, 2), "<i2"))
    proc = run_cli("--file", str(path), "--channel-labels", "a,b,c", "--url", f"ws://127.0.0.1:{_free_port()}/v1/stream")
    assert proc.returncode == 2
    assert "--channel-labels names 3 channel(s) but" in proc.stderr and "has 2" in proc.stderr
    assert "connection refused" not in proc.stderr, "checked before connecting"


def test_a_second_ctrl_c_after_the_graceful_finish_still_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Both presses can land while the session finishes on its own (a short utterance finalizes
    within the 50 ms between them): the user asked to quit, so the exit code says interrupted,
    not a death by signal (-2) or a plain success."""
    import signal

    from mic_client import cli

    previous = signal.getsignal(signal.SIGINT)
    try:
        captured: list[cli.Interrupts] = []

        def run(coro, *args, **kwargs):  # type: ignore[no-untyped-def]
            interrupts = coro.cr_frame.f_locals["interrupts"]
            coro.close()
            interrupts.presses = 2  # the graceful press and the quit press, both handled by the loop
            captured.append(interrupts)
            return cli.EXIT_OK

        monkeypatch.setattr(cli.asyncio, "run", run)
        assert cli.main(["--file", __file__, "--url", "ws://127.0.0.1:9/v1/stream"]) == cli.EXIT_ABORTED
        assert "interrupted" in capsys.readouterr().err and captured
        # A KeyboardInterrupt that escapes the loop (its handlers already removed) is the same.

        def interrupted(coro, *args, **kwargs):  # type: ignore[no-untyped-def]
            coro.close()
            raise KeyboardInterrupt

        monkeypatch.setattr(cli.asyncio, "run", interrupted)
        assert cli.main(["--file", __file__, "--url", "ws://127.0.0.1:9/v1/stream"]) == cli.EXIT_ABORTED

        # So is a second press that cancels the run while it closes its audio source.
        def cancelled(coro, *args, **kwargs):  # type: ignore[no-untyped-def]
            coro.close()
            raise asyncio.CancelledError

        monkeypatch.setattr(cli.asyncio, "run", cancelled)
        assert cli.main(["--file", __file__, "--url", "ws://127.0.0.1:9/v1/stream"]) == cli.EXIT_ABORTED
        assert "interrupted" in capsys.readouterr().err

        # Real signals: one handled by the running loop, one after the loop has closed (where
        # asyncio used to put the default handler back, and the process died by the signal).
        real_run = asyncio.run

        def signalled(coro, *args, **kwargs):  # type: ignore[no-untyped-def]
            interrupts = coro.cr_frame.f_locals["interrupts"]
            coro.close()
            pressed: list[int] = []

            async def session() -> None:
                interrupts.attach(asyncio.get_running_loop(), pressed.append)
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(100):
                    if pressed:
                        break
                    await asyncio.sleep(0.01)

            real_run(session())
            assert pressed == [1], "the running loop got the first press"
            os.kill(os.getpid(), signal.SIGINT)  # after the loop closed: only counted
            return cli.EXIT_OK

        monkeypatch.setattr(cli.asyncio, "run", signalled)
        assert cli.main(["--file", __file__, "--url", "ws://127.0.0.1:9/v1/stream"]) == cli.EXIT_ABORTED
        assert signal.getsignal(signal.SIGINT) is previous, "main restores the handler it replaced"
    finally:
        signal.signal(signal.SIGINT, previous)
