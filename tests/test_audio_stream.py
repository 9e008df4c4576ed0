"""Compressed audio decoded as it arrives (``stream_server.audio_stream``): real FFmpeg on real
encodings of a tone-speech clip, fed in pieces as a WebSocket client sends them."""

from __future__ import annotations

import gc
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream_server.audio_files import decode_file
from stream_server.audio_stream import ContainerStream, Decoded
from tests.fakes import silence, speech
from tests.http_api_support import encode

# (file name, PyAV encoder, container): what browsers (MediaRecorder: WebM or Ogg Opus), radio
# streams (MP3, AAC in ADTS) and recorders (FLAC) send.
STREAMABLE = [
    ("clip.webm", "libopus", "webm"),
    ("clip.ogg", "libopus", "ogg"),
    ("clip.mp3", "libmp3lame", None),
    ("clip.flac", "flac", None),
    ("clip.aac", "aac", "adts"),
]

CLIP = np.concatenate([silence(0.3), speech([1, 2, 3], seconds=0.4), silence(1.0), speech([4, 5], seconds=0.4), silence(0.5)])


def finish(stream: ContainerStream) -> Decoded:
    """The stream's end and its last audio: without a wake-up, ``end`` waits for the decoder."""
    assert stream.end(), "the decoder finished"
    return stream.poll()


def encoded(tmp_path: Path, name: str, codec: str, container: str | None) -> bytes:
    return encode(CLIP, tmp_path / name, codec, container=container).read_bytes()


def pieces(data: bytes, count: int) -> list[bytes]:
    size = -(-len(data) // count)
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(("name", "codec", "container"), STREAMABLE)
def test_a_stream_fed_in_pieces_decodes_as_the_whole_file_does_and_as_it_comes(tmp_path, name, codec, container) -> None:
    data = encoded(tmp_path, name, codec, container)
    whole = decode_file(io.BytesIO(data))
    stream = ContainerStream()
    out: list[np.ndarray] = []
    early = 0
    chunks = pieces(data, 40)
    for i, chunk in enumerate(chunks):
        decoded = stream.feed(chunk)
        assert decoded.error is None
        out.append(decoded.samples)
        if i == len(chunks) - 2:
            early = sum(len(s) for s in out)
    last = finish(stream)
    assert last.error is None and last.channels == 1
    audio = np.concatenate([*out, last.samples])
    # The same samples as the file decoded at once; an MP3 stream keeps the encoder's padding at
    # its end (19 ms here), which only a file's end tells the decoder to trim.
    assert 0 <= len(audio) - len(whole) <= 0.03 * 16000
    np.testing.assert_allclose(audio[: len(whole)], whole, atol=1e-6)
    # Audio comes out while the stream is still arriving: before its last piece, all but the
    # stream's last page or frames (an Ogg muxer's pages are ~1 s here; FLAC's silent frames
    # are a few bytes, so its last piece holds seconds).
    assert early > 0.6 * len(whole)


def test_the_first_audio_of_an_mp3_stream_comes_within_its_first_half_second(tmp_path) -> None:
    """FFmpeg's default probe held an MP3 stream's first audio back for 1.4 s of it."""
    data = encode(np.concatenate([CLIP, CLIP]), tmp_path / "long.mp3", "libmp3lame", rate=44100).read_bytes()
    seconds = 2 * len(CLIP) / 16000
    stream = ContainerStream()
    fed = 0
    for chunk in pieces(data, int(seconds / 0.1)):  # 100 ms of stream per message
        fed += len(chunk)
        if stream.feed(chunk).samples.size:
            break
    assert fed / len(data) * seconds <= 0.6


def test_channels_are_kept_or_mixed(tmp_path) -> None:
    left, right = speech([1, 2], seconds=0.4), 0.5 * speech([3, 4], seconds=0.4)
    path = encode(np.stack([left, right], axis=1), tmp_path / "stereo.webm", "libopus", container="webm")
    data = path.read_bytes()
    kept = ContainerStream(keep_channels=True)
    first = kept.feed(data)
    last = finish(kept)
    assert first.channels == last.channels == 2
    both = np.concatenate([first.samples, last.samples]).reshape(-1, 2)
    loud = np.sqrt(np.mean(both**2, axis=0))
    assert loud[0] > 1.5 * loud[1] > 0, "the left channel is the louder one, in its place"
    mixed = ContainerStream()
    mono = np.concatenate([mixed.feed(data).samples, finish(mixed).samples])
    assert finish(mixed).channels == 1 and len(mono) == len(both)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"#EXTM3U\n#EXTINF:10,\nhttp://example.com/a.mp3\n" * 4, "playlists"),
        (b"this is not audio at all; " * 200, "not a recognised audio format"),
        (bytes(range(256)) * 40, "not a recognised audio format"),
    ],
)
def test_what_is_not_audio_is_an_error_and_nothing_else(data: bytes, why: str) -> None:
    stream = ContainerStream()
    errors = [d.error for d in (stream.feed(piece) for piece in pieces(data, 5)) if d.error]
    errors += [e for e in [finish(stream).error] if e]
    assert len(errors) == 1 and why in errors[0], errors


def test_an_mp4_that_needs_seeking_says_it_decoded_nothing(tmp_path) -> None:
    """An M4A written for files keeps its index at the end: a stream cannot be read back for it."""
    data = encode(CLIP, tmp_path / "clip.m4a", "aac", container="mp4").read_bytes()
    stream = ContainerStream()
    out = [stream.feed(piece) for piece in pieces(data, 10)] + [finish(stream)]
    assert not any(d.samples.size for d in out)
    assert [d.error for d in out if d.error] == ["no audio could be decoded from the stream"]


def test_a_stream_that_breaks_off_keeps_the_audio_before_the_break(tmp_path) -> None:
    data = encoded(tmp_path, "clip.webm", "libopus", "webm")
    stream = ContainerStream()
    got = stream.feed(data[: len(data) // 2]).samples
    got = np.concatenate([got, stream.feed(b"\x00\xff" * 4000).samples, finish(stream).samples])
    assert len(got) > 0.3 * len(CLIP)


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "audio-stream"]


def wait_for_no_decoder_threads() -> bool:
    deadline = time.monotonic() + 5
    while decoder_threads() and time.monotonic() < deadline:
        gc.collect()  # streams other tests dropped
        time.sleep(0.01)
    return not decoder_threads()


def test_release_and_dropping_a_stream_end_its_decoder_thread(tmp_path) -> None:
    data = encoded(tmp_path, "clip.ogg", "libopus", "ogg")
    assert wait_for_no_decoder_threads()
    released = ContainerStream()
    released.feed(data[:5000])
    dropped = ContainerStream()
    dropped.feed(data[:5000])
    assert len(decoder_threads()) == 2, "each stream has a worker waiting for its next bytes"
    released.release()
    del dropped
    gc.collect()
    assert wait_for_no_decoder_threads(), "a connection that goes leaves no thread behind"


def test_a_message_that_holds_more_audio_than_the_bound_is_cut_there(tmp_path) -> None:
    """A decompression bomb (FLAC of silence: 40 s in a few KB) stops at ``max_ahead_s``; a
    stream whose messages each hold less goes on however long it is."""
    data = encode(np.zeros(40 * 16000, np.float32), tmp_path / "silence.flac", "flac").read_bytes()
    bomb = ContainerStream(max_ahead_s=10)
    first = bomb.feed(data)
    assert first.error is not None and "more than 10 s of audio" in first.error
    assert 10 * 16000 <= len(first.samples) < 11 * 16000, "the audio up to the bound is kept"
    assert finish(bomb).error is None, "said once"
    paced = ContainerStream(max_ahead_s=10)
    out = [paced.feed(piece) for piece in pieces(data, 20)]
    last = finish(paced)
    assert not any(d.error for d in [*out, last])
    assert sum(len(d.samples) for d in [*out, last]) == 40 * 16000


def test_audio_a_feed_does_not_wait_for_comes_through_the_wakeup(tmp_path) -> None:
    """With a wake-up (an event loop to call back), a large message is not waited for: the feed
    returns at once and the wake-up says when there is audio to poll, and when the end is."""
    data = encode(np.tile(CLIP, 12), tmp_path / "long.webm", "libopus", container="webm").read_bytes()
    woken = threading.Event()
    stream = ContainerStream(wakeup=woken.set)
    started = time.monotonic()
    first = stream.feed(data)  # ~50 s of audio in one message
    returned = time.monotonic() - started
    got = [first.samples]
    done = stream.end()
    while not done:
        assert woken.wait(10), "the worker announces what it decoded"
        woken.clear()
        done = stream.done
        got.append(stream.poll().samples)
    got.append(stream.poll().samples)
    assert sum(len(g) for g in got) == len(decode_file(io.BytesIO(data)))
    print(f"feed returned after {returned * 1000:.0f} ms with {len(first.samples) / 16000:.1f} s of audio")
    assert returned < 1.0
