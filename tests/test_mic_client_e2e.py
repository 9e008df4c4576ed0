"""End-to-end tests of ``mic-client`` against the real ``stream-server`` on real speech.

* ``--file`` streaming (wav at real time, a multi-utterance mp3 with SRT output, Ctrl-C mid-file,
  a server error, a busy server);
* the real capture path: a private PulseAudio daemon with a pipe source ``virtual_mic`` that a test
  thread feeds like a sound card (silence, then a speech WAV, at real time); it is the default ALSA
  capture device (through the ``pulse`` ALSA plugin), so ``mic-client`` with no ``--file`` records
  it with sounddevice/PortAudio exactly as it would a microphone. Packages:
  ``tests/setup_virtual_mic.sh``.

Real speech comes from ``../shared/speech`` (skipped with a reason when absent). The server is
started once per module as a subprocess on a free port.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mic_client.captions import format_clock
from tests.support import REPO, SPEECH_DIR, ServerProcess, manifest, normalize, read_wav, require_speech, start_server, wer

pytestmark = pytest.mark.slow

SERVER_START_TIMEOUT_S = 180
MAX_WER = 0.3


def clip(clip_id: str) -> tuple[Path, str]:
    """The WAV path and reference text of a corpus clip."""
    record = manifest().get(clip_id)
    if record is None or not (SPEECH_DIR / record["path"]).is_file():
        pytest.skip(f"clip {clip_id} not in the speech corpus at {SPEECH_DIR}")
    return SPEECH_DIR / record["path"], record["text"]


# ------------------------------------------------------------------------------------------------
# Server and client processes
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_speech()  # skip before paying for a server start when there is no speech to send
    srv = start_server(tmp_path_factory.mktemp("server"), timeout=SERVER_START_TIMEOUT_S)
    yield srv
    srv.stop()


def mic_client_cmd() -> list[str]:
    """The installed ``mic-client`` console script if there is one, else ``python -m mic_client``."""
    script = Path(sys.executable).with_name("mic-client")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "mic_client"]


def run_client(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*mic_client_cmd(), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_srt(text: str) -> list[tuple[int, float, float, str]]:
    def seconds(stamp: str) -> float:
        h, m, rest = stamp.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        start, end = lines[1].split(" --> ")
        cues.append((int(lines[0]), seconds(start), seconds(end), " ".join(lines[2:])))
    return cues


def check_session_events(events: list[dict], *, update_accepted: bool = True) -> dict:
    """Checks every client-visible guarantee of a finished session; returns the done event."""
    assert events, "no events were written"
    types = [e["type"] for e in events]
    assert types[0] == "session.created", types[:3]
    if update_accepted:
        updated = next(e for e in events if e["type"] == "session.updated")
        assert updated["session"]["interim_results"] is True  # the client asked for live captions
    assert types.count("transcript.text.done") == 1, "expected exactly one transcript.text.done"
    assert types[-1] == "transcript.text.done", (
        f"events after done: {types[types.index('transcript.text.done') :]}"
    )
    stamps = [e["received_at"] for e in events]
    assert all(isinstance(s, float) for s in stamps)
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] - time.time()) < 600  # wall-clock Unix seconds
    done = events[-1]
    deltas = "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta")
    assert deltas == done["text"], "the deltas the client recorded do not add up to done.text"
    return done


# ------------------------------------------------------------------------------------------------
# --file
# ------------------------------------------------------------------------------------------------


def test_file_at_real_time_gives_live_events_and_an_accurate_transcript(
    server: ServerProcess, tmp_path: Path
) -> None:
    path, reference = clip("ljspeech_LJ001-0001")  # 9.7 s, one long sentence
    duration = len(read_wav(path)) / 16000
    out = tmp_path / "session.jsonl"
    started = time.monotonic()
    proc = run_client("--file", str(path), "--url", server.ws_url, "--output", str(out))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"stderr:\n{proc.stderr}\nserver log:\n{server.log_tail()}"
    assert elapsed >= duration - 0.5, "the file was not streamed at real-time pace"

    events = read_events(out)
    done = check_session_events(events)
    assert abs(done["usage"]["seconds"] - duration) < 0.1, "the server did not get the whole file"
    types = [e["type"] for e in events]
    assert "transcript.text.interim" in types, "interim_results was requested but no interim arrived"
    segments = [e for e in events if e["type"] == "transcript.segment"]
    assert segments
    # stdout is a pipe here: exactly the final lines, no control characters.
    assert proc.stdout.splitlines() == [s["text"] for s in segments if s["text"].strip()]
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    error = wer([reference], [done["text"]])
    print(f"WER {error:.3f} on {path.name}: {done['text']!r}")
    assert error < MAX_WER, f"WER {error:.2f}: {done['text']!r} vs {reference!r}"


def _concatenate(clip_ids: list[str], gap_s: float, out: Path) -> tuple[np.ndarray, str]:
    """Real clips joined by silence: a stream of several utterances with natural pauses."""
    parts: list[np.ndarray] = []
    refs: list[str] = []
    gap = np.zeros(int(gap_s * 16000), dtype="<i2")
    for clip_id in clip_ids:
        path, text = clip(clip_id)
        parts += [read_wav(path, dtype="int16"), gap]
        refs.append(text)
    samples = np.concatenate(parts)
    _encode_44k_stereo(samples, out)
    return samples, " ".join(refs)


def _encode_44k_stereo(samples: np.ndarray, path: Path) -> None:
    import av

    codec = {".mp3": "libmp3lame", ".flac": "flac"}[path.suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=44100)
        stream.layout = "stereo"
        resampler = av.AudioResampler(format=stream.format.name, layout="stereo", rate=44100)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(chunk):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_multi_utterance_mp3_to_srt(server: ServerProcess, tmp_path: Path) -> None:
    mp3 = tmp_path / "three_sentences.mp3"
    samples, reference = _concatenate(
        [
            "arctic_slt_arctic_a0003",
            "arctic_slt_arctic_a0009",
            "pocketsphinx_sense_and_sensibility_01_austen_64kb-0880",
        ],
        gap_s=1.2,
        out=mp3,
    )
    duration = len(samples) / 16000
    srt = tmp_path / "captions.srt"
    proc = run_client("--file", str(mp3), "--speed", "2", "--url", server.ws_url, "--output", str(srt))
    assert proc.returncode == 0, f"stderr:\n{proc.stderr}\nserver log:\n{server.log_tail()}"
    # One voice copied to both sides of a stereo mp3 is one speaker, not two legs.
    assert "2 channels carrying the same audio, streamed as mono" in proc.stderr, proc.stderr
    cues = parse_srt(srt.read_text(encoding="utf-8"))
    assert [c[0] for c in cues] == list(range(1, len(cues) + 1))
    assert len(cues) >= 3, f"expected one cue per sentence (pauses of 1.2 s), got {cues}"
    for (_, start, end, text), nxt in zip(cues, [*cues[1:], None], strict=True):
        assert 0 <= start < end <= duration + 0.2 and text
        if nxt is not None:
            assert end <= nxt[1] + 0.05, "cues overlap"
    hypothesis = " ".join(c[3] for c in cues)
    assert proc.stdout.split() == hypothesis.split()
    error = wer([reference], [hypothesis])
    print(f"WER {error:.3f} on 3 utterances (mp3, 44.1 kHz stereo, speed 2): {hypothesis!r}")
    assert error < MAX_WER, f"WER {error:.2f}: {hypothesis!r} vs {reference!r}"


# ------------------------------------------------------------------------------------------------
# A two-leg call as a stereo WAV
# ------------------------------------------------------------------------------------------------

#: (clip, start second) per leg: two different voices whose turns overlap and abut, as in a call.
CALL_LEGS = {
    "agent": [("arctic_slt_arctic_a0003", 0.5), ("arctic_slt_arctic_a0007", 7.6), ("ljspeech_LJ001-0002", 14.6)],
    "customer": [("arctic_aew_arctic_a0002", 3.2), ("arctic_aew_arctic_a0001", 10.4)],
}
# A leg in the stereo call may read one word otherwise than alone, and 5% of a longer leg: the
# mono and stereo runs decode different windows. As 0.05 alone this allowed no word on the
# customer's 16 (one is 0.0625): on the host of 2026-12-05, late, the code that had passed read
# "Philip Stills" in the call and "Philip Steels" alone, with two ctranslate2 and onnxruntime
# versions alike.
LEG_WER_MARGIN = 0.05
SEGMENT_LINE = re.compile(r"^\[(\d\d):(\d\d\.\d)\] (agent|customer): (.+)$")


def _call_wav(tmp_path: Path) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """The stereo call (agent left, customer right), each leg alone as a mono WAV, and each leg's
    reference text."""
    legs: dict[str, np.ndarray] = {}
    references: dict[str, str] = {}
    length = 0
    for speaker, parts in CALL_LEGS.items():
        placed = []
        for clip_id, at in parts:
            path, text = clip(clip_id)
            placed.append((int(at * 16000), read_wav(path, dtype="int16")))
            references[speaker] = f"{references.get(speaker, '')} {text}".strip()
        leg = np.zeros(max(i + len(a) for i, a in placed) + 16000, "<i2")
        for i, audio in placed:
            leg[i : i + len(audio)] = audio
        legs[speaker] = leg
        length = max(length, len(leg))
    for speaker, leg in legs.items():
        legs[speaker] = np.pad(leg, (0, length - len(leg)))
    stereo = tmp_path / "call.wav"
    _write_wav(stereo, np.stack([legs["agent"], legs["customer"]], axis=1))
    mono = {}
    for speaker, leg in legs.items():
        mono[speaker] = tmp_path / f"{speaker}.wav"
        _write_wav(mono[speaker], leg)
    return stereo, mono, references


def _write_wav(path: Path, frames: np.ndarray) -> None:
    import wave

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1 if frames.ndim == 1 else frames.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(frames.astype("<i2").tobytes())


def test_stereo_call_shows_both_legs_with_speakers(server: ServerProcess, tmp_path: Path) -> None:
    stereo, mono, references = _call_wav(tmp_path)
    url = ("--url", server.ws_url)
    jsonl, srt = tmp_path / "call.jsonl", tmp_path / "call.srt"
    labels = ("--channel-labels", "agent,customer")
    proc = run_client("--file", str(stereo), "--speed", "0", *labels, *url, "--output", str(jsonl))
    assert proc.returncode == 0, f"stderr:\n{proc.stderr}\nserver log:\n{server.log_tail()}"
    assert "2 channels: agent, customer" in proc.stderr

    # The session: two channels, each with its own utterances and text.
    events = read_events(jsonl)
    updated = next(e for e in events if e["type"] == "session.updated")
    assert updated["session"]["channels"] == 2 and updated["session"]["channel_labels"] == ["agent", "customer"]
    done = events[-1]
    assert done["type"] == "transcript.text.done"
    segments = [e for e in events if e["type"] == "transcript.segment"]
    for channel, speaker in enumerate(("agent", "customer")):
        mine = [e for e in events if e.get("channel") == channel and "item_id" in e]
        assert mine and all(e["speaker"] == speaker for e in mine), speaker
        deltas = "".join(e["delta"] for e in mine if e["type"] == "transcript.text.delta")
        assert done["channels"][channel] == {"channel": channel, "speaker": speaker, "text": deltas}
    assert [t["start"] for t in done["turns"]] == sorted(t["start"] for t in done["turns"])

    # stdout (a pipe): one line per segment, "[mm:ss.s] speaker: text", as the segments came.
    lines = proc.stdout.splitlines()
    assert lines == [
        f"[{format_clock(s['start'])}] {s['speaker']}: {s['text'].strip()}"
        for s in segments
        if s["text"].strip()
    ]
    said: dict[str, list[str]] = {"agent": [], "customer": []}
    for line in lines:
        match = SEGMENT_LINE.match(line)
        assert match, line
        said[match[3]].append(match[4])

    # Accuracy per leg: as good as streaming that leg alone (a mono file, the same way).
    for speaker, path in mono.items():
        alone = run_client("--file", str(path), "--speed", "0", *url)
        assert alone.returncode == 0, alone.stderr
        assert not SEGMENT_LINE.match(alone.stdout.splitlines()[0]), "a mono file keeps the plain form"
        mono_wer = wer([references[speaker]], [alone.stdout])
        leg_wer = wer([references[speaker]], [" ".join(said[speaker])])
        print(f"{speaker}: WER {leg_wer:.3f} in the stereo call, {mono_wer:.3f} alone; {said[speaker]}")
        one_word = 1 / len(normalize(references[speaker]).split())
        assert leg_wer <= mono_wer + max(LEG_WER_MARGIN, one_word), (speaker, said[speaker], references[speaker])
        assert leg_wer < MAX_WER

    # SRT: cues name their speaker and are in time order.
    proc = run_client("--file", str(stereo), "--speed", "0", *labels, *url, "--output", str(srt))
    assert proc.returncode == 0, proc.stderr
    cues = parse_srt(srt.read_text(encoding="utf-8"))
    assert [c[0] for c in cues] == list(range(1, len(cues) + 1))
    assert [c[1] for c in cues] == sorted(c[1] for c in cues)
    assert {c[3].split(": ", 1)[0] for c in cues} == {"agent", "customer"}
    overlaps = [(a, b) for a, b in itertools.pairwise(cues) if b[1] < a[2]]
    assert overlaps, "the legs talk over each other: some cues overlap"


def _emulate_terminal(output: str) -> list[str]:
    """Replay terminal output (\\r, \\n, ESC[K, SGR) and return the rows left on screen."""
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)
    rows, col = [""], 0
    for token in re.findall(r"\x1b\[K|\r|\n|[^\r\n\x1b]", output):
        if token == "\x1b[K":
            rows[-1] = rows[-1][:col]
        elif token == "\r":
            col = 0
        elif token == "\n":
            rows.append("")
            col = 0
        else:
            rows[-1] = rows[-1][:col] + token + rows[-1][col + 1 :]
            col += 1
    return rows


def test_tty_shows_interim_text_in_place_and_finals_as_lines(server: ServerProcess, tmp_path: Path) -> None:
    """stdout is a pseudo-terminal here, as when a person runs mic-client in a shell."""
    import fcntl
    import pty
    import struct
    import termios

    path, _ = clip("ljspeech_LJ001-0001")
    out = tmp_path / "tty.jsonl"
    columns = 60
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(
        [*mic_client_cmd(), "--file", str(path), "--speed", "1.5", "--url", server.ws_url, "--output", str(out)],
        cwd=REPO,
        env=env,
        stdout=slave,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    output = b"".join(chunks).decode("utf-8")
    events = read_events(out)
    segments = [e["text"] for e in events if e["type"] == "transcript.segment" and e["text"].strip()]
    interims = [e for e in events if e["type"] == "transcript.text.interim" and e["text"].strip()]
    assert interims, "no interim text to show"
    assert output.count("\r\x1b[K") >= len(interims) // 2, "interim text was not redrawn in place"
    assert "\x1b[2m" in output, "interim text is not dimmed"
    rows = _emulate_terminal(output)
    assert [row for row in rows if row] == segments
    # Live lines (redrawn, never ended by a newline) must fit the terminal: a wrapped one would
    # leave stale rows behind. Final lines may wrap; they are never redrawn.
    live = [re.sub(r"\x1b\[[0-9;]*m", "", part) for part in output.split("\r\x1b[K") if "\n" not in part]
    assert live and max(len(part) for part in live) <= columns - 1


def test_ctrl_c_mid_file_finalizes_what_was_sent_and_exits_0(server: ServerProcess, tmp_path: Path) -> None:
    path, _ = clip("ljspeech_LJ001-0003")  # 9.7 s
    out = tmp_path / "interrupted.jsonl"
    proc = subprocess.Popen(
        [*mic_client_cmd(), "--file", str(path), "--url", server.ws_url, "--output", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_event(out, "input_audio_buffer.speech_started", proc, timeout=30)
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"stderr:\n{stderr}\nserver log:\n{server.log_tail()}"
    assert "finishing" in stderr
    done = check_session_events(read_events(out))
    assert 2.0 < done["usage"]["seconds"] < 8.0, "Ctrl-C should stop the stream early"
    assert done["text"].strip(), "the speech sent before Ctrl-C was not transcribed"
    assert stdout.strip(), "the final text was not printed"


def test_second_ctrl_c_quits_at_once_with_130(server: ServerProcess, tmp_path: Path) -> None:
    path, _ = clip("ljspeech_LJ001-0003")
    out = tmp_path / "aborted.jsonl"
    proc = subprocess.Popen(
        [*mic_client_cmd(), "--file", str(path), "--url", server.ws_url, "--output", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_event(out, "input_audio_buffer.speech_started", proc, timeout=30)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr
    if proc.returncode == 0:
        # The utterance was short enough to finalize within the 50 ms between the presses and the
        # second one landed as the process exited: ignored then, never a death by the signal (-2).
        assert read_events(out)[-1]["type"] == "transcript.text.done", stderr
        return
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [(("--language", "1x"), "invalid_value"), (("--language", "fr"), "unsupported_language"), (("--model", "tiny-typo"), "model_not_found")],
)
def test_refused_settings_go_to_stderr_and_exit_2_before_any_audio(server: ServerProcess, tmp_path: Path, args: tuple[str, str], code: str) -> None:
    """The server keeps its defaults after a refused session.update (protocol.md); the client does
    not stream into them: French speech read by tiny.en, or 44.1 kHz audio read as 16 kHz, would be
    a wrong transcript with no warning. ``fr``: the default model is English-only."""
    path, _ = clip("arctic_slt_arctic_a0004")
    out = tmp_path / "refused.jsonl"
    proc = run_client("--file", str(path), "--speed", "0", *args, "--url", server.ws_url, "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert code in proc.stderr and "nothing was streamed" in proc.stderr
    assert "Traceback" not in proc.stderr
    events = read_events(out)
    # protocol.md: a rejected session.update is answered by error, not session.updated.
    assert [e["type"] for e in events][:2] == ["session.created", "error"]
    assert events[1]["error"]["code"] == code and events[1]["error"]["param"].startswith("session.")
    assert next(e for e in events if e["type"] == "transcript.text.done")["text"] == ""
    assert not [e for e in events if e["type"] == "input_audio_buffer.speech_started"], "no audio was sent"


def test_busy_server_exits_2(tmp_path: Path) -> None:
    path, _ = clip("arctic_slt_arctic_a0004")
    from websockets.sync.client import connect

    srv = start_server(tmp_path, "--max-sessions", "1", timeout=SERVER_START_TIMEOUT_S)
    try:
        with connect(srv.ws_url) as holder:
            first = json.loads(holder.recv(timeout=30))
            assert first["type"] == "session.created"
            proc = run_client("--file", str(path), "--url", srv.ws_url, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "busy" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        srv.stop()


def test_server_dying_mid_session_exits_1_promptly(tmp_path: Path) -> None:
    path, _ = clip("ljspeech_LJ001-0001")
    srv = start_server(tmp_path, timeout=SERVER_START_TIMEOUT_S)
    try:
        out = tmp_path / "lost.jsonl"
        proc = subprocess.Popen(
            [*mic_client_cmd(), "--file", str(path), "--url", srv.ws_url, "--output", str(out)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for_event(out, "input_audio_buffer.speech_started", proc, timeout=30)
        srv.process.kill()
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        assert time.monotonic() - killed_at < 10, "the client kept streaming to a dead server"
        assert "connection to the server was lost" in stderr
        assert "Traceback" not in stderr
    finally:
        srv.stop()


def _wait_for_event(path: Path, event_type: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and f'"type":"{event_type}"' in path.read_text(encoding="utf-8"):
            return
        if proc.poll() is not None:
            _, stderr = proc.communicate()
            pytest.fail(f"mic-client exited with {proc.returncode} before {event_type}:\n{stderr}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {event_type} within {timeout} s")


# ------------------------------------------------------------------------------------------------
# The real capture path: sounddevice -> PortAudio -> ALSA pulse plugin -> PulseAudio virtual mic
# ------------------------------------------------------------------------------------------------


class VirtualMic:
    """A PulseAudio ``module-pipe-source`` fed like a microphone: a steady real-time sample stream.

    A writer thread puts 20 ms of audio into the source's FIFO every 20 ms (by the monotonic
    clock): digital silence, or the speech queued with :meth:`say`. That is what a sound card does
    -- samples keep coming whether anyone speaks or not -- and it makes the captured audio exact:
    the speech arrives bit for bit, at real time, when the test says.

    (A null sink's monitor fed with ``paplay`` was tried first and is not usable for this: the null
    sink renders up to ~2 s ahead in large blocks, so a recorder misses its first ~2 s and hears
    playback before it "happens".)
    """

    CHUNK_S = 0.02

    def __init__(self, env: dict[str, str], fifo: Path, source: str) -> None:
        self.env = env
        self.source = source
        self._fifo = fifo
        self._queue: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._write, name="virtual-mic", daemon=True)
        self._thread.start()

    def say(self, samples: np.ndarray) -> None:
        """Queue 16 kHz mono int16 samples; they are "spoken" at real time from now on."""
        with self._lock:
            self._idle.clear()
            self._queue.append(samples.astype("<i2"))

    def wait_until_spoken(self, timeout: float) -> None:
        assert self._idle.wait(timeout), "the virtual microphone did not finish playing"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _write(self) -> None:
        per_chunk = int(16000 * self.CHUNK_S)
        silence = np.zeros(per_chunk, dtype="<i2")
        # PulseAudio holds the FIFO open for reading, so this open does not block.
        fd = os.open(self._fifo, os.O_WRONLY)
        try:
            t0 = time.monotonic()
            k = 0
            while not self._stop.is_set():
                with self._lock:
                    chunk = silence
                    if self._queue:
                        head = self._queue[0]
                        chunk, self._queue[0] = head[:per_chunk], head[per_chunk:]
                        if not len(self._queue[0]):
                            self._queue.pop(0)
                        if len(chunk) < per_chunk:
                            chunk = np.concatenate([chunk, silence[: per_chunk - len(chunk)]])
                    elif not self._idle.is_set():
                        self._idle.set()
                os.write(fd, chunk.tobytes())
                k += 1
                delay = t0 + k * self.CHUNK_S - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        finally:
            os.close(fd)


@pytest.fixture
def virtual_mic() -> Iterator[VirtualMic]:
    hint = "run tests/setup_virtual_mic.sh to install it"
    for tool in ("pulseaudio", "pactl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed; {hint}")
    if not Path("/usr/share/alsa/alsa.conf.d/50-pulseaudio.conf").exists() and not any(
        Path(d).glob("**/libasound_module_pcm_pulse.so") for d in ("/usr/lib", "/usr/lib64")
    ):
        pytest.skip(f"the ALSA pulse plugin (libasound2-plugins) is not installed; {hint}")
    try:
        import sounddevice  # noqa: F401  (needs the PortAudio shared library)
    except OSError as exc:
        pytest.skip(f"sounddevice cannot load PortAudio ({exc}); {hint}")

    # A short private directory: the socket path must fit in sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="vmic-"))
    home = root / "home"
    for sub in ("home", "runtime", "state"):
        (root / sub).mkdir()
    socket_path = root / "runtime" / "native"
    fifo = root / "mic.fifo"
    # ALSA reads ~/.asoundrc: route the default PCM to PulseAudio whatever the system config says.
    (home / ".asoundrc").write_text("pcm.!default { type pulse }\nctl.!default { type pulse }\n")
    env = {
        **os.environ,
        "HOME": str(home),
        "PULSE_RUNTIME_PATH": str(root / "runtime"),
        "PULSE_STATE_PATH": str(root / "state"),
        "PULSE_SERVER": f"unix:{socket_path}",
    }
    env.pop("DISPLAY", None)
    source = "virtual_mic"
    log = (root / "pulseaudio.log").open("wb")
    # -n: no default.pa (no hardware probing, no D-Bus); only the modules named here.
    proc = subprocess.Popen(
        [
            "pulseaudio",
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--use-pid-file=no",
            "--disallow-exit",
            "--disable-shm=yes",
            "--log-target=stderr",
            "--log-level=error",
            "-L",
            f"module-native-protocol-unix auth-anonymous=1 socket={socket_path}",
            "-L",
            f"module-pipe-source source_name={source} file={fifo} format=s16le rate=16000 "
            "channels=1 source_properties=device.description=VirtualMic",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    mic: VirtualMic | None = None
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (root / "pulseaudio.log").read_text(errors="replace")
                pytest.skip(f"PulseAudio could not be started here (exit {proc.poll()}):\n{text[-2000:]}")
            time.sleep(0.1)
        subprocess.run(["pactl", "set-default-source", source], env=env, check=True)
        mic = VirtualMic(env, fifo, source)
        yield mic
    finally:
        if mic is not None:
            mic.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("device", "clip_id"),
    [(None, "ljspeech_LJ001-0004"), ("pulse", "ljspeech_LJ001-0011")],
    ids=["default-input", "device-by-name"],
)
def test_virtual_microphone_is_captured_and_transcribed(
    server: ServerProcess, virtual_mic: VirtualMic, tmp_path: Path, device: str | None, clip_id: str
) -> None:
    path, reference = clip(clip_id)  # ~5 s of read speech
    speech = read_wav(path, dtype="int16")
    listed = run_client("--list-devices", env=virtual_mic.env, timeout=30)
    assert listed.returncode == 0 and "pulse" in listed.stdout, listed.stdout + listed.stderr
    out = tmp_path / "mic.jsonl"
    # No --file: the microphone -- the system default input, or the ALSA "pulse" device by name.
    device_args = [] if device is None else ["--device", device]
    proc = subprocess.Popen(
        [*mic_client_cmd(), "--url", server.ws_url, "--output", str(out), *device_args],
        cwd=REPO,
        env=virtual_mic.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_event(out, "session.updated", proc, timeout=30)
        time.sleep(0.5)  # some silence before the speaker starts
        virtual_mic.say(speech)
        virtual_mic.wait_until_spoken(timeout=len(speech) / 16000 + 10)
        time.sleep(1.5)  # the pause after speaking, which ends the utterance
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"stderr:\n{stderr}\nserver log:\n{server.log_tail()}"
    assert "streaming microphone" in stderr
    events = read_events(out)
    done = check_session_events(events)
    # Everything from connect to Ctrl-C was captured: >= 0.5 + 5.1 + 1.5 s.
    assert done["usage"]["seconds"] > 0.5 + len(speech) / 16000 + 1.0
    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    assert started and started[0]["audio_start_ms"] >= 100, "the silence before the speech was not captured"
    error = wer([reference], [done["text"]])
    print(f"WER {error:.3f} through the virtual microphone: {done['text']!r}")
    assert error < MAX_WER, f"WER {error:.2f}: {done['text']!r} vs {reference!r}"
    assert stdout.strip()
