"""The HTTP APIs against a real server process, through the real client libraries (unmodified).

* OpenAI's ``openai`` SDK: every response format, ``stream=True`` with typed events and logprobs.
* ``huggingface_hub.InferenceClient(model=URL).automatic_speech_recognition``.
* ``airefinery-sdk``'s ``AsyncAIRefinery(...).audio.transcriptions.create``, batch and streamed.
* the curl examples in ``docs/http_examples.sh``; the error contract; uploads in real codecs.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.http_api_support import JFK_TEXT, encode, jfk_path, running_server, write_wav
from tests.support import REPO, normalize, read_wav, wer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def base_url():
    with running_server() as url:
        yield url


@pytest.fixture(scope="module")
def small_limit_url():
    """A second server whose upload limit is 200 kB, for the size checks."""
    with running_server(max_file_bytes=200_000) as url:
        yield url


@pytest.fixture
def jfk() -> Path:
    return jfk_path()


def close_to_jfk(text: str) -> bool:
    return wer([JFK_TEXT], [text]) <= 0.15


# --------------------------------------------------------------------------------- OpenAI SDK


@pytest.fixture(scope="module")
def openai_client(base_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def test_openai_json(openai_client, jfk):
    with jfk.open("rb") as f:
        result = openai_client.audio.transcriptions.create(model="whisper-1", file=f, language="en-US")
    assert close_to_jfk(result.text), result.text
    assert result.usage.type == "duration" and result.usage.seconds == pytest.approx(11.0, abs=0.05)
    extra = result.model_extra or {}
    assert extra["success"] is True and extra["error"] is None
    assert 0.5 < extra["confidence"] <= 1.0


def test_openai_json_logprobs(openai_client, jfk):
    with jfk.open("rb") as f:
        result = openai_client.audio.transcriptions.create(model="gpt-4o-transcribe", file=f, include=["logprobs"])
    assert result.logprobs, "include[]=logprobs must return token logprobs"
    assert "".join(lp.token for lp in result.logprobs) == result.text
    assert all(lp.logprob <= 0 and lp.bytes == list(lp.token.encode()) for lp in result.logprobs)


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_openai_text_formats(openai_client, jfk, fmt):
    with jfk.open("rb") as f:
        body = openai_client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
    assert isinstance(body, str)
    if fmt == "text":
        assert close_to_jfk(body)
        return
    lines = body.strip().splitlines()
    if fmt == "vtt":
        assert lines[0] == "WEBVTT"
        assert "00:00:00.0" in body and " --> " in body
    else:
        assert lines[0] == "1" and "00:00:00,0" in lines[1] and " --> " in lines[1]
    cue_text = " ".join(line for line in lines if line and "-->" not in line and not line.isdigit() and line != "WEBVTT")
    assert close_to_jfk(cue_text), cue_text


def test_openai_verbose_json_words(openai_client, jfk):
    with jfk.open("rb") as f:
        result = openai_client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    assert close_to_jfk(result.text)
    assert result.language == "english"
    assert result.duration == pytest.approx(11.0, abs=0.05)
    assert result.segments and result.words
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and all(s.end >= s.start for s in result.segments)
    assert " ".join(s.text.strip() for s in result.segments) == result.text
    assert all(s.avg_logprob <= 0 and 0 <= s.no_speech_prob <= 1 and s.compression_ratio > 0 for s in result.segments)
    words = [w.word for w in result.words]
    assert normalize(" ".join(words)) == normalize(result.text)
    assert all(0 <= w.start <= w.end <= 11.05 for w in result.words)
    assert [w.start for w in result.words] == sorted(w.start for w in result.words)


def test_openai_verbose_json_without_words(openai_client, jfk):
    with jfk.open("rb") as f:
        result = openai_client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json")
    assert result.segments and result.words is None


def test_openai_stream(openai_client, jfk):
    from openai.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent

    with jfk.open("rb") as f:
        stream = openai_client.audio.transcriptions.create(
            model="whisper-1", file=f, stream=True, include=["logprobs"], language="en"
        )
        events = list(stream)
    deltas = [e for e in events if isinstance(e, TranscriptionTextDeltaEvent)]
    done = [e for e in events if isinstance(e, TranscriptionTextDoneEvent)]
    assert len(deltas) >= 2 and len(done) == 1 and events[-1] is done[0]
    text = "".join(d.delta for d in deltas)
    assert text == done[0].text and close_to_jfk(text)
    assert all(d.logprobs and "".join(lp.token for lp in d.logprobs) == d.delta for d in deltas)
    assert [lp.token for d in deltas for lp in d.logprobs] == [lp.token for lp in done[0].logprobs]
    usage = done[0].model_dump()["usage"]
    assert usage["type"] == "duration" and usage["seconds"] == pytest.approx(11.0, abs=0.05)


def test_openai_chunking_strategy_object(openai_client, jfk):
    # The SDK sends an object in bracket form: chunking_strategy[type]=server_vad, ...
    with jfk.open("rb") as f:
        result = openai_client.audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            chunking_strategy={"type": "server_vad", "silence_duration_ms": 1500, "prefix_padding_ms": 200, "threshold": 0.5},
        )
    assert close_to_jfk(result.text)
    with jfk.open("rb") as f:
        default = openai_client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json")
    # A longer silence requirement never makes more segments.
    assert len(result.segments) <= len(default.segments)


def test_openai_sdk_errors(openai_client, jfk):
    import openai

    with jfk.open("rb") as f, pytest.raises(openai.NotFoundError) as info:
        openai_client.audio.transcriptions.create(model="no-such-model", file=f)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with jfk.open("rb") as f, pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.transcriptions.create(model="whisper-1", file=f, temperature=3)
    assert info.value.body["param"] == "temperature"
    # The default model is English-only: French would come back as English words, so it is refused.
    with jfk.open("rb") as f, pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.transcriptions.create(model="whisper-1", file=f, language="fr")
    assert info.value.body["code"] == "unsupported_language" and info.value.body["param"] == "language"
    assert "'tiny.en' transcribes English only" in info.value.body["message"]


def test_translations_on_the_english_only_default(openai_client, base_url, jfk):
    """tiny.en has no translate task: it transcribes, which for English speech is the translation
    (``test_language`` translates German, Spanish and French with ``base``)."""
    import openai

    with jfk.open("rb") as f:
        result = openai_client.audio.translations.create(model="whisper-1", file=f, response_format="verbose_json")
    assert close_to_jfk(result.text) and result.language == "english"
    assert result.model_extra["task"] == "translate" and result.segments
    with jfk.open("rb") as f:
        assert close_to_jfk(openai_client.audio.translations.create(model="whisper-1", file=f, response_format="text"))
    with jfk.open("rb") as f, pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.translations.create(model="whisper-1", file=f, extra_body={"language": "de"})
    assert info.value.body["code"] == "unsupported_language"
    assert_error(post(base_url, files={"file": jfk.read_bytes()}, data={"response_format": "diarized_json"}, path="/v1/audio/translations"),
                 400, "invalid_value", "response_format")


def test_openai_models_list(openai_client):
    ids = [m.id for m in openai_client.models.list()]
    assert "tiny.en" in ids and "whisper-1" in ids


def test_models_listing_fields(base_url):
    data = httpx.get(base_url + "/v1/models").json()["data"]
    tiny = next(m for m in data if m["id"] == "tiny.en")
    assert tiny["object"] == "model" and tiny["owned_by"] and tiny["languages"] == ["en"]
    assert tiny["timestamps"] == ["segment", "word"] and tiny["logprobs"] is True
    assert next(m for m in data if m["id"] == "whisper-1")["alias_of"] == "tiny.en"
    assert httpx.get(base_url + "/v1/models/whisper-1").json()["alias_of"] == "tiny.en"
    assert httpx.get(base_url + "/v1/models/nope").status_code == 404
    assert httpx.get(base_url + "/healthz").json()["status"] == "ok"
    assert httpx.get(base_url + "/readyz").status_code == 200


# ---------------------------------------------------------------------------- codecs, content


@pytest.mark.parametrize(
    ("name", "codec", "container"),
    [
        ("clip.mp3", "libmp3lame", None),
        ("clip.flac", "flac", None),
        ("clip.ogg", "libopus", "ogg"),
        ("clip.webm", "libopus", "webm"),
        ("clip.m4a", "aac", "mp4"),
        ("clip.wav", "pcm_s16le", None),
    ],
)
def test_upload_formats(base_url, jfk, tmp_path, name, codec, container):
    path = encode(read_wav(jfk), tmp_path / name, codec, container=container, rate=44100 if codec == "libmp3lame" else 16000)
    # A misleading name and type: the content decides.
    with path.open("rb") as f:
        resp = httpx.post(
            base_url + "/v1/audio/transcriptions", files={"file": ("upload.bin", f, "application/octet-stream")}, timeout=120
        )
    assert resp.status_code == 200, resp.text
    assert close_to_jfk(resp.json()["text"]), resp.json()


def test_resampled_stereo_48k(base_url, jfk, tmp_path):
    import soundfile

    mono = read_wav(jfk)
    stereo48 = np.repeat(np.interp(np.arange(len(mono) * 3) / 3, np.arange(len(mono)), mono)[:, None], 2, axis=1)
    soundfile.write(tmp_path / "s.wav", stereo48.astype(np.float32), 48000, subtype="PCM_16")
    with (tmp_path / "s.wav").open("rb") as f:
        resp = httpx.post(base_url + "/v1/audio/transcriptions", files={"file": f}, timeout=120)
    assert close_to_jfk(resp.json()["text"])
    assert resp.json()["usage"]["seconds"] == pytest.approx(11.0, abs=0.05)


# ------------------------------------------------------------------------------ error contract


def post(base_url: str, files=None, data=None, path: str = "/v1/audio/transcriptions", **kwargs) -> httpx.Response:
    return httpx.post(base_url + path, files=files, data=data, timeout=120, **kwargs)


def assert_error(resp: httpx.Response, status: int, code: str, param: str | None = "<any>") -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param != "<any>":
        assert error["param"] == param
    return error


def test_missing_file(base_url):
    assert_error(post(base_url, data={"model": "whisper-1"}, files={"x": ("a.txt", b"hi")}), 400, "missing_file", "file")
    assert_error(post(base_url, files={"file": (None, b"not a file part")}), 400, "missing_file", "file")
    assert_error(httpx.post(base_url + "/v1/audio/transcriptions", json={"model": "whisper-1"}), 400, "missing_file", "file")


def test_unknown_model(base_url, jfk):
    assert_error(post(base_url, files={"file": jfk.read_bytes()}, data={"model": "whisper-9000"}), 404, "model_not_found", "model")
    assert_error(post(base_url, files={"file": jfk.read_bytes()}, data={"model": "/etc"}), 404, "model_not_found", "model")


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("response_format", "diarized_jsonl", "response_format"),
        ("temperature", "hot", "temperature"),
        ("temperature", "1.5", "temperature"),
        ("language", "english!", "language"),
        ("timestamp_granularities[]", "sentence", "timestamp_granularities"),
        ("include[]", "everything", "include"),
        ("stream", "maybe", "stream"),
        ("chunking_strategy", "manual", "chunking_strategy"),
        ("chunking_strategy", '{"type": "server_vad", "threshold": 2}', "chunking_strategy.threshold"),
        ("chunking_strategy", '{"type": "server_vad", "silence_duration_ms": "long"}', "chunking_strategy.silence_duration_ms"),
        ("chunking_strategy", '{"type": "semantic"}', "chunking_strategy.type"),
        ("extra_body", "[1]", "extra_body"),
        ("timeout", "soon", "timeout"),
        ("multichannel", "both", "multichannel"),
        ("channel_labels", "agent,,customer", "channel_labels"),
        ("channel_labels", ",".join("abcdefghi"), "channel_labels"),
    ],
)
def test_invalid_parameter(base_url, jfk, field, value, param):
    error = assert_error(post(base_url, files={"file": jfk.read_bytes()}, data={field: value}), 400, "invalid_value", param)
    assert param in error["message"]


def test_channels_that_do_not_fit_the_request(base_url, jfk, tmp_path):
    """Labels for another number of channels than the file has, and a file with more channels
    than a session takes, are the client's mistakes (400), found once the file is decoded."""
    import soundfile

    mono = read_wav(jfk)
    stereo = write_wav(np.stack([mono, mono * 0.5], 1), tmp_path / "two.wav")
    error = assert_error(post(base_url, files={"file": stereo.read_bytes()}, data={"channel_labels": "agent,customer,supervisor"}), 400, "invalid_value", "channel_labels")
    assert "2 channel(s)" in error["message"]
    assert_error(post(base_url, files={"file": jfk.read_bytes()}, data={"channel_labels": "agent,customer"}), 400, "invalid_value", "channel_labels")
    soundfile.write(tmp_path / "nine.wav", np.repeat(mono[:16000, None], 9, axis=1), 16000, subtype="PCM_16")
    error = assert_error(post(base_url, files={"file": (tmp_path / "nine.wav").read_bytes()}, data={"multichannel": "true"}), 400, "too_many_channels", "multichannel")
    assert "9 channels" in error["message"]
    # Without it the channels are mixed to one voice: past 8 channels FFmpeg has no downmix and
    # this answered 500; they are averaged now.
    mixed = post(base_url, files={"file": (tmp_path / "nine.wav").read_bytes()})
    assert mixed.status_code == 200 and "channels" not in mixed.json()
    assert normalize(mixed.json()["text"]).startswith("and so"), mixed.json()
    assert mixed.json()["usage"]["seconds"] == pytest.approx(1.0)
    # Speakers are told apart by channel: one channel has one (the answer says so, not "A" throughout).
    error = assert_error(post(base_url, files={"file": jfk.read_bytes()}, data={"response_format": "diarized_json"}), 400, "diarization_unavailable", "response_format")
    assert "by channel" in error["message"]


def test_openai_model_names_mean_the_default_model(base_url, jfk):
    """OpenAI's current transcription names (``gpt-transcribe``) and dated snapshots of any of
    them are the server's default model, as ``whisper-1`` is; other unknown names stay 404."""
    for name in ("gpt-transcribe", "gpt-4o-transcribe-2026-03-01", "gpt-4o-transcribe-diarize"):
        resp = post(base_url, files={"file": jfk.read_bytes()}, data={"model": name})
        assert resp.status_code == 200 and close_to_jfk(resp.json()["text"]), (name, resp.text)
    assert_error(post(base_url, files={"file": jfk.read_bytes()}, data={"model": "gpt-4o"}), 404, "model_not_found", "model")


def test_too_large_by_content_length(small_limit_url):
    # Only headers are sent: the answer must come before any of the body is read.
    host, port = small_limit_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/audio/transcriptions")
    conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 413 and body["error"]["code"] == "file_too_large" and body["error"]["param"] == "file"
    conn.close()


def test_too_large_chunked_upload(small_limit_url):
    # No Content-Length (chunked): the server counts while reading and stops at the limit.
    sent = 0

    def body():
        nonlocal sent
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        for _ in range(400):
            sent += 8192
            yield b"\0" * 8192
        yield b"\r\n--xyz--\r\n"

    try:
        resp = httpx.post(
            small_limit_url + "/v1/audio/transcriptions",
            content=body(),
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
            timeout=30,
        )
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        # The server may close the connection while the client is still sending; the status
        # line then cannot be read by httpx. The raw-socket check below covers the answer.
        pytest.skip("client saw the early close before the response")
    assert_error(resp, 413, "file_too_large", "file")


def test_too_large_after_parse(small_limit_url, jfk):
    # An ordinary upload with Content-Length just over the limit.
    audio = np.zeros(16000 * 7, np.float32)  # 224 kB as pcm16 WAV
    import io

    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    assert_error(post(small_limit_url, files={"file": ("a.wav", buf.getvalue())}), 413, "file_too_large", "file")
    # Under the limit is fine on the same server.
    assert post(small_limit_url, files={"file": ("a.wav", buf.getvalue()[: 100_000])}).status_code == 200


def test_unsupported_media_by_content(base_url, tmp_path):
    cases = {
        "notes.wav": b"this is plain text, not audio at all\n" * 20,
        "image.mp3": base64.b64decode(
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
        ),
        "list.m4a": b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n",
        "random.ogg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }
    for name, data in cases.items():
        assert_error(post(base_url, files={"file": (name, data, "audio/wav")}), 415, "unsupported_media_type", "file")


def test_empty_file(base_url):
    assert_error(post(base_url, files={"file": ("empty.wav", b"", "audio/wav")}), 400, "empty_file", "file")


def test_zero_length_audio(base_url, tmp_path):
    path = write_wav(np.zeros(0, np.float32), tmp_path / "zero.wav")
    resp = post(base_url, files={"file": path.read_bytes()}, data={"response_format": "verbose_json"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["text"] == "" and body["segments"] == [] and body["duration"] == 0 and body["confidence"] is None


def test_silence_gives_empty_text(base_url, tmp_path):
    rng = np.random.default_rng(1)
    for name, audio in {
        "digital_silence": np.zeros(16000 * 8, np.float32),
        "room_noise": (rng.standard_normal(16000 * 8) * 0.002).astype(np.float32),
    }.items():
        path = write_wav(audio, tmp_path / f"{name}.wav")
        resp = post(base_url, files={"file": path.read_bytes()})
        assert resp.status_code == 200 and resp.json()["text"] == "", (name, resp.text)
        assert resp.json()["usage"]["seconds"] == pytest.approx(8.0)


def test_corrupt_audio(base_url, jfk, tmp_path):
    data = jfk.read_bytes()
    # Truncated mid-file: the decodable part is transcribed.
    resp = post(base_url, files={"file": ("cut.wav", data[: len(data) // 2])})
    assert resp.status_code == 200 and "americans" in normalize(resp.json()["text"])
    # A valid 44-byte WAV header followed by random bytes: decoded as the (noise) samples they are.
    header = write_wav(np.zeros(16000, np.float32), tmp_path / "h.wav").read_bytes()[:44]
    rng = np.random.default_rng(2)
    resp = post(base_url, files={"file": ("noise.wav", header + rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())})
    assert resp.status_code == 200 and isinstance(resp.json()["text"], str)
    # The header and nothing after it: zero-length audio.
    resp = post(base_url, files={"file": ("hdr.wav", header)})
    assert resp.status_code == 200 and resp.json()["text"] == ""
    # Bytes that are no container at all, behind a real file's name: 415, decided by content.
    resp = post(base_url, files={"file": ("jfk.wav", data[1000:40_000])})
    assert_error(resp, 415, "unsupported_media_type", "file")


# --------------------------------------------------------------------------------- Hugging Face


def test_huggingface_inference_client(base_url, jfk):
    hub = pytest.importorskip("huggingface_hub")
    client = hub.InferenceClient(model=base_url + "/models/tiny.en")
    out = client.automatic_speech_recognition(str(jfk))
    assert close_to_jfk(out.text)
    assert out.chunks and all(c.timestamp[0] <= c.timestamp[1] for c in out.chunks)
    out = client.automatic_speech_recognition(
        jfk.read_bytes(),
        extra_body={"return_timestamps": "word", "generation_parameters": {"temperature": 0.0, "num_beams": 1, "max_new_tokens": 128}},
    )
    assert close_to_jfk(out.text) and len(out.chunks) >= 15
    # The Hugging Face id of the same checkpoint works too.
    client = hub.InferenceClient(model=base_url + "/models/openai/whisper-tiny.en")
    assert close_to_jfk(client.automatic_speech_recognition(jfk.read_bytes()).text)


def test_huggingface_wire_format(base_url, jfk):
    url = base_url + "/models/tiny.en"
    headers = {"x-wait-for-model": "true", "x-use-cache": "false"}
    raw = httpx.post(url, content=jfk.read_bytes(), headers={**headers, "Content-Type": "audio/wav"}, timeout=120)
    assert raw.status_code == 200 and close_to_jfk(raw.json()["text"])
    payload = {"inputs": base64.b64encode(jfk.read_bytes()).decode(), "parameters": {"return_timestamps": True}}
    body = httpx.post(url, json=payload, headers=headers, timeout=120).json()
    assert close_to_jfk(body["text"]) and all(set(c) == {"text", "timestamp"} for c in body["chunks"])
    assert_error(httpx.post(base_url + "/models/nope", content=b"x"), 404, "model_not_found", "model_id")
    assert_error(httpx.post(url, json={"inputs": "%%%"}), 400, "invalid_value", "inputs")
    assert_error(httpx.post(url, json={"parameters": {}}), 400, "missing_file", "inputs")
    bad = {"inputs": payload["inputs"], "parameters": {"generation_parameters": {"num_beams": "two"}}}
    assert_error(httpx.post(url, json=bad), 400, "invalid_value", "parameters.generation_parameters.num_beams")
    assert_error(httpx.post(url, content=b"GIF89a not audio"), 415, "unsupported_media_type", "file")


# -------------------------------------------------------------------------------- AI Refinery


def import_airefinery():
    """airefinery-sdk asks for Python >= 3.12. On 3.11 only ``typing.override`` is missing for the
    audio client (``air.types.base`` imports it); it is a no-op decorator (PEP 698), so we give
    ``typing`` the ``typing_extensions`` one. The SDK's code itself is not touched."""
    pytest.importorskip("aiohttp")
    import typing

    if sys.version_info < (3, 12) and not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    try:
        import air
    except ImportError as exc:  # pragma: no cover - depends on the installed SDK
        pytest.skip(f"airefinery-sdk not importable: {exc}")
    return air


def test_airefinery_sdk_batch_and_stream(base_url, jfk):
    air = import_airefinery()
    from air.types.audio import TranscriptionTextDeltaEvent, TranscriptionTextDoneEvent, TranscriptionVerbose

    async def run():
        client = air.AsyncAIRefinery(api_key="unused", base_url=base_url)
        with jfk.open("rb") as f:
            batch = await client.audio.transcriptions.create(model="whisper-1", file=f)
        with jfk.open("rb") as f:
            verbose = await client.audio.transcriptions.create(
                model="whisper-1",
                file=f,
                response_format="verbose_json",
                timestamp_granularities=["word", "segment"],
                chunking_strategy={"type": "server_vad", "prefix_padding_ms": 300, "silence_duration_ms": 500, "threshold": 0.5},
                extra_body={"language": "en-US"},
                timeout=120,
            )
        events = []
        with jfk.open("rb") as f:
            stream = await client.audio.transcriptions.create(model="whisper-1", file=f, stream=True)
            async for event in stream:
                events.append(event)
        return batch, verbose, events

    batch, verbose, events = asyncio.run(run())
    assert close_to_jfk(batch.text)
    assert isinstance(verbose, TranscriptionVerbose) and verbose.language == "en-US"
    assert verbose.segments and verbose.words and all(w.confidence is not None for w in verbose.words)
    deltas = [e for e in events if isinstance(e, TranscriptionTextDeltaEvent)]
    done = [e for e in events if isinstance(e, TranscriptionTextDoneEvent)]
    assert deltas and len(done) == 1
    assert "".join(d.text for d in deltas) == done[0].text and close_to_jfk(done[0].text)


def test_airefinery_wire_format(base_url, jfk):
    """The request exactly as airefinery-sdk 1.33 builds it (aiohttp FormData), sent with httpx,
    so the format stays covered where the SDK cannot be installed."""
    fields = {
        "model": "whisper-1",
        "chunking_strategy": "auto",
        "language": "en-US",
        "response_format": "json",
        "timestamp_granularities": "[]",
        "include": json.dumps(["confidence", "segment"]),
        "stream": "False",
        "timeout": "None",
        "extra_body": "{}",
    }
    files = {"file": ("whisper_jfk.wav", jfk.read_bytes(), "audio/wav")}
    body = httpx.post(base_url + "/v1/audio/transcriptions", data=fields, files=files, timeout=120).json()
    assert close_to_jfk(body["text"]) and body["success"] is True and body["error"] is None and 0 < body["confidence"] <= 1
    fields.update(stream="True", extra_body=json.dumps({"response_format": "json"}))
    with httpx.stream("POST", base_url + "/v1/audio/transcriptions", data=fields, files=files, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[5:]) for line in lines[:-1]]
    assert [e["type"] for e in events][-1] == "transcript.text.done"
    assert "".join(e["text"] for e in events if e["type"] == "transcript.text.delta") == events[-1]["text"]


# --------------------------------------------------------------------------------------- curl


def test_curl_examples(base_url, jfk, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    script = REPO / "docs" / "http_examples.sh"
    env = {**os.environ, "BASE": base_url, "AUDIO": str(jfk)}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    sections = {}
    for block in out.split("### ")[1:]:
        name, _, body = block.partition("\n")
        sections[name.strip()] = body
    assert close_to_jfk(json.loads(sections["json"])["text"])
    assert close_to_jfk(sections["text"])
    assert close_to_jfk(sections["translation"])
    assert sections["srt"].lstrip().startswith("1\n00:00:00,")
    assert sections["vtt"].lstrip().startswith("WEBVTT")
    assert json.loads(sections["verbose_json"])["words"]
    assert sections["stream"].rstrip().endswith("data: [DONE]")
    assert close_to_jfk(json.loads(sections["huggingface"])["text"])
    assert json.loads(sections["huggingface_json"])["chunks"]
    assert any(m["id"] == "tiny.en" for m in json.loads(sections["models"])["data"])
    assert json.loads(sections["error"])["error"]["code"] == "model_not_found"


# ------------------------------------------------------------------------- server-side failures


def test_model_unavailable_is_502(base_url, jfk):
    # A faster-whisper hub name the server knows of but cannot download (tests run offline).
    resp = post(base_url, files={"file": jfk.read_bytes()}, data={"model": "large-v3"})
    if resp.status_code == 200:
        pytest.skip("the machine could download large-v3; nothing to check offline")
    assert_error(resp, 502, "model_unavailable", "model")


def test_decoder_failure_is_500(tmp_path):
    """In-process app with a fake decoder that fails every final decode (the retry included)."""
    from starlette.testclient import TestClient

    from stream_server.engine import Engine
    from stream_server.server import create_app
    from stream_server.settings import Settings
    from tests.fakes import BurstDecoder, EnergyVad, speech

    decoder = BurstDecoder()
    settings = Settings(model="tiny.en")
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: decoder)
    path = write_wav(np.concatenate([np.zeros(8000, np.float32), speech([1, 2, 3]), np.zeros(16000, np.float32)]), tmp_path / "b.wav")
    with TestClient(create_app(settings, engine)) as client:
        ok = client.post("/v1/audio/transcriptions", files={"file": path.read_bytes()})
        assert ok.status_code == 200 and ok.json()["text"] == "w1 w2 w3"
        decoder.fail_next = 10
        bad = client.post("/v1/audio/transcriptions", files={"file": path.read_bytes()})
        assert_error(bad, 500, "decode_failed", None)
        assert "injected decoder failure" in bad.json()["error"]["message"]
