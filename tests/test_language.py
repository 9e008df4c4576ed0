"""The detected language per utterance: the core's rule (detect until a decode has heard enough
audio, then keep it), where it shows (segment, Deepgram, AudioHook, verbose_json), and the real
``base`` model through the real server on the corpus's non-English clips.

The core tests use the deterministic fakes with a decoder that "detects" a language from how much
audio it was given, the way a real detector misjudges short windows."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from stream_server import protocol as p
from stream_server.decoding import (
    LANGUAGE_SETTLE_PROBABILITY,
    LANGUAGE_SETTLE_S,
    DecodeRequest,
    DecodeResult,
    choose_language,
    language_settled,
)
from stream_server.formats import file_language
from stream_server.http.openai_form import FileOptions
from stream_server.models import base_available
from stream_server.session import Session, SessionLimits
from tests.fakes import BurstDecoder, EnergyVad, silence, speech
from tests.support import ServerProcess, load_clip, manifest, require_speech, start_server
from tests.test_dialect_audiohook import AudioHookHarness, call_audio
from tests.test_dialect_deepgram import SDK_QUERY, DeepgramHarness, finals
from tests.test_session import Driver, spoken

RATE = 16000


class DetectingDecoder(BurstDecoder):
    """A multilingual fake: a request without a language is heard as ``short`` (probability 0.5)
    below ``switch_s`` of audio and as ``long`` (probability ``sure``) from there on, then chosen
    as the real decoder chooses (its hint when unsure); a request's own language is always
    honoured (probability 1)."""

    multilingual = True

    def __init__(self, short: str = "en", long: str = "de", switch_s: float = 1.0, sure: float = 0.97) -> None:
        super().__init__()
        self.short, self.long, self.switch_s, self.sure = short, long, switch_s, sure
        self.results: list[tuple[DecodeRequest, DecodeResult]] = []

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        words = super().decode_one(request)
        if request.language:
            language, probability = request.language, 1.0
        else:
            heard, sure = (self.long, self.sure) if len(request.audio) >= self.switch_s * RATE else (self.short, 0.5)
            others = [code for code in ("en", "de", "es", "pt", "ca", "fr") if code != heard]
            ranked = [(f"<|{heard}|>", sure), *((f"<|{code}|>", (1 - sure) / len(others)) for code in others)]
            language, probability = choose_language(ranked, request.language_hint)
        result = DecodeResult(words.words, language, words.no_speech_prob, words.avg_logprob, language_probability=probability)
        self.results.append((request, result))
        return result

    def requests(self) -> list[DecodeRequest]:
        return [r for r, _ in self.results]


def detecting_driver(decoder: DetectingDecoder, **config: Any) -> Driver:
    d = Driver(**{"model": "base", **config})
    d.decoder = decoder
    return d


def test_language_settles_on_a_decode_with_enough_audio_and_a_sure_detection() -> None:
    enough = int(LANGUAGE_SETTLE_S * RATE)
    assert language_settled(enough, LANGUAGE_SETTLE_PROBABILITY)
    assert not language_settled(enough - RATE // 100, 1.0), "too little audio, however sure"
    assert not language_settled(3 * enough, LANGUAGE_SETTLE_PROBABILITY - 0.01), "long, but unsure"


def test_a_long_utterance_keeps_the_language_its_first_long_decode_heard() -> None:
    """Interim decodes detect until one settles (enough audio, a sure detection); from then on
    every decode of the utterance is forced to that language (no flip-flop), and the segment
    reports it."""
    decoder = DetectingDecoder(short="en", long="de", switch_s=1.5)
    d = detecting_driver(decoder)
    d.feed(speech(range(1, 12)))  # ~4.1 s
    d.feed(silence(1.0))
    d.close()
    requests = decoder.requests()
    settled_at = next(i for i, (r, res) in enumerate(decoder.results) if language_settled(len(r.audio), res.language_probability))
    assert len(requests[settled_at].audio) >= 1.5 * RATE
    assert all(r.language is None for r in requests[: settled_at + 1]), "short windows detect, each time"
    assert requests[settled_at + 1 :], "decodes after the settling one"
    assert all(r.language == "de" for r in requests[settled_at + 1 :]), "then the settled language is forced"
    [segment] = d.of(p.TranscriptSegment)
    assert segment.language == "de"


def test_an_unsure_utterance_reports_its_final_decodes_language() -> None:
    """Never settled (no detection sure enough): every decode detects again, and the segment
    reports what the last one, the final decode of the whole utterance, heard."""
    decoder = DetectingDecoder(short="en", long="ca", switch_s=1.2, sure=LANGUAGE_SETTLE_PROBABILITY - 0.2)
    d = detecting_driver(decoder)
    d.feed(speech(range(1, 9)))  # ~3 s of speech
    d.feed(silence(1.0))
    d.close()
    requests = decoder.requests()
    assert all(r.language is None for r in requests)
    assert any(len(r.audio) < 1.2 * RATE for r in requests), "early interims heard 'en'"
    [segment] = d.of(p.TranscriptSegment)
    assert segment.language == decoder.results[-1][1].language == "ca"


def test_each_utterance_detects_its_own_language() -> None:
    decoder = DetectingDecoder(short="en", long="de", switch_s=1.0)
    d = detecting_driver(decoder)
    d.feed(speech(range(1, 10)))
    d.feed(silence(1.2))
    first_utterance = len(decoder.requests())
    decoder.long = "es"
    d.feed(speech(range(1, 10)))
    d.feed(silence(1.2))
    d.close()
    second = decoder.requests()[first_utterance:]
    assert second[0].language is None, "a new utterance starts undecided"
    assert [s.language for s in d.of(p.TranscriptSegment)] == ["de", "es"]


def test_an_unsure_detection_decodes_in_the_language_the_channel_settled_on() -> None:
    """After an utterance settled on Spanish, a short phrase the detector is unsure of (it says
    Portuguese at 0.54) is decoded, and reported, as Spanish; a sure detection still switches."""
    assert choose_language([("<|pt|>", 0.54), ("<|es|>", 0.40)], "es") == ("es", 0.40)
    assert choose_language([("<|pt|>", 0.54), ("<|es|>", 0.40)], None) == ("pt", 0.54)
    assert choose_language([("<|de|>", 0.95), ("<|es|>", 0.01)], "es") == ("de", 0.95)
    assert choose_language([("<|pt|>", 0.54)], "xx") == ("pt", 0.54), "a hint the detector does not know is ignored"
    decoder = DetectingDecoder(short="pt", long="es", switch_s=2.2)
    d = detecting_driver(decoder)
    d.feed(speech(range(1, 9)))
    d.feed(silence(1.2))
    first = len(decoder.requests())
    d.feed(speech([1, 2]))  # under switch_s: only unsure "pt" detections
    d.feed(silence(1.2))
    d.close()
    second = decoder.requests()[first:]
    assert second and all(r.language is None and r.language_hint == "es" for r in second)
    assert [s.language for s in d.of(p.TranscriptSegment)] == ["es", "es"]


def file_driver(decoder: DetectingDecoder, context_lag: int = 0) -> Driver:
    """A file's session (no interims) whose decodes take long enough that every turn's final is
    asked for before the first comes back, as a file's are (``context_lag``: as the engine runs
    a file, each final held until the turn ``context_lag`` before it is final)."""
    session = Session(
        "sess_file0001",
        config=p.SessionConfig(model="base"),
        vad=EnergyVad(),
        limits=SessionLimits(interim_decoding=False, max_utterance_s=6.0, final_context_lag=context_lag),
    )
    d = Driver(session, latency_chunks=2000)
    d.decoder = decoder
    return d


def test_a_files_unsure_turn_asked_for_before_the_channel_settled_is_decoded_again_with_the_hint() -> None:
    """The short turn's final went out with no hint, came back unsure and Portuguese after the
    first turn settled on Spanish, and is decoded again hinted, as a live turn would have been; a
    request with a hint is never redone."""
    decoder = DetectingDecoder(short="pt", long="es", switch_s=2.2)
    d = file_driver(decoder)
    d.feed(speech(range(1, 9)))
    d.feed(silence(1.2))
    d.feed(speech([1, 2]))
    d.feed(silence(1.2))
    d.close()
    finals = decoder.requests()
    assert [r.language_hint for r in finals] == [None, None, "es"], "the short turn, once more, hinted"
    assert [s.language for s in d.of(p.TranscriptSegment)] == ["es", "es"]
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(*range(1, 9)), spoken(1, 2)]


def test_a_files_first_unsure_turn_waits_for_a_later_turn_to_settle_the_language() -> None:
    """"Olá, bom dia" opening a Catalan file came back Portuguese before any turn had settled:
    its result now waits while a longer turn is out, and is decoded again with that turn's
    language; with nothing left that could settle one, an unsure result stands."""
    decoder = DetectingDecoder(short="pt", long="ca", switch_s=2.2)
    d = file_driver(decoder)
    d.feed(speech([1, 2]))
    d.feed(silence(1.2))
    d.feed(speech(range(1, 9)))
    d.feed(silence(1.2))
    d.feed(speech([3]))
    d.feed(silence(1.2))
    d.close()
    assert [r.language_hint for r in decoder.requests()] == [None, None, None, "ca", "ca"]
    segments = d.of(p.TranscriptSegment)
    assert [s.language for s in segments] == ["ca", "ca", "ca"]
    assert [s.text for s in segments] == [spoken(1, 2), spoken(*range(1, 9)), spoken(3)]
    decoder = DetectingDecoder(short="pt", long="ca", switch_s=2.2)
    d = file_driver(decoder)
    d.feed(speech([1, 2]))
    d.feed(silence(1.2))
    d.feed(speech([3]))
    d.feed(silence(1.2))
    d.close()
    assert [r.language_hint for r in decoder.requests()] == [None, None], "nothing could settle: no decode is redone"
    assert [s.language for s in d.of(p.TranscriptSegment)] == ["pt", "pt"]


def test_a_parked_turn_does_not_wait_for_finals_that_wait_for_its_own_text() -> None:
    """As the engine runs a file, a turn's final is held until the turn four before it is final
    (its prompt): those held finals may be waiting for the parked turn itself, so they do not
    count as able to settle the language (counted, the session never finished)."""
    decoder = DetectingDecoder(short="pt", long="ca", switch_s=LANGUAGE_SETTLE_S)
    d = file_driver(decoder, context_lag=4)
    for _ in range(4):  # four short turns go out at once; the long ones wait for their text
        d.feed(speech([1, 2]))
        d.feed(silence(1.2))
    for _ in range(2):
        d.feed(speech(range(1, 9)))
        d.feed(silence(1.2))
    d.close()
    segments = d.of(p.TranscriptSegment)
    assert len(segments) == 6 and d.of(p.TranscriptDone), "every turn final, the session done"
    # The first short turn's result stands (nothing sent could settle a language); the next three
    # wait for the long turn its final released, and are decoded again in its language.
    assert [r.language_hint for r in decoder.requests()] == [None] * 5 + ["ca"] * 3 + [None]
    assert [s.language for s in segments] == ["pt"] + ["ca"] * 5


def test_a_session_language_is_forced_and_reported() -> None:
    decoder = DetectingDecoder(short="en", long="de")
    d = detecting_driver(decoder, language="pt-BR")
    d.feed(speech(range(1, 8)))
    d.feed(silence(1.0))
    d.close()
    assert {r.language for r in decoder.requests()} == {"pt"}
    assert [s.language for s in d.of(p.TranscriptSegment)] == ["pt"]


def test_an_english_only_model_reports_english() -> None:
    d = Driver()  # BurstDecoder: English-only, like tiny.en
    d.feed(speech([1, 2, 3, 4]))
    d.feed(silence(1.0))
    d.close()
    assert [s.language for s in d.of(p.TranscriptSegment)] == ["en"]


def test_an_utterance_cleared_before_any_decode_has_no_language() -> None:
    d = detecting_driver(DetectingDecoder())
    d.feed(speech([1]))
    d.send({"type": "input_audio_buffer.clear"})
    d.close()
    segments = d.of(p.TranscriptSegment)
    assert segments and all(s.language is None for s in segments)
    assert all(json.loads(p.event_to_json(s))["language"] is None for s in segments)


# --------------------------------------------------------------------------------------------
# Where each API shows it
# --------------------------------------------------------------------------------------------


def test_deepgram_multi_finals_carry_languages_as_the_sdk_models_them() -> None:
    h = DeepgramHarness({**SDK_QUERY, "language": "multi", "model": "base"})
    h.decoder = DetectingDecoder(short="en", long="de", switch_s=1.0)
    h.feed(np.concatenate([silence(0.3), speech(range(1, 9)), silence(1.2)]))
    h.send({"type": "CloseStream"})
    h.settle()
    results = finals(h)  # h.messages() validated every message against the SDK's models
    assert any(r["speech_final"] for r in results)
    spoken = [r for r in results if r["channel"]["alternatives"][0]["words"]]
    assert spoken
    for result in [*spoken, *(r for r in results if r["speech_final"])]:
        alternative = result["channel"]["alternatives"][0]
        assert alternative["languages"] == ["de"]
        assert all(w["language"] == "de" for w in alternative["words"])


@pytest.mark.parametrize("query", [{"detect_language": "true"}, {"language": "multi"}])
def test_deepgram_detects_with_multi_or_detect_language(query: dict[str, str]) -> None:
    from stream_server.dialects import deepgram as dg

    options = dg.parse_options({**SDK_QUERY, **query}, lambda name: True, "req")
    assert options.language is None and dg.native_config(options)["language"] is None


def test_deepgram_with_a_language_sends_no_languages_field() -> None:
    h = DeepgramHarness({**SDK_QUERY, "language": "de", "model": "base"})
    h.feed(np.concatenate([speech(range(1, 6)), silence(1.2)]))
    h.settle()
    for result in finals(h):
        alternative = result["channel"]["alternatives"][0]
        assert "languages" not in alternative and all("language" not in w for w in alternative["words"])


def test_audiohook_finals_carry_the_detected_language_unless_the_client_set_one() -> None:
    """Genesys' transcript entity has ``alternatives[].languages`` and ``tokens[].language``."""
    for client_language, expected in ((None, "de"), ("en-US", "en-US")):
        h = AudioHookHarness()
        h.decoder = DetectingDecoder(short="en", long="de", switch_s=1.0)
        h.open(**({"language": client_language} if client_language else {}))
        data, _, _ = call_audio()
        h.send_audio(data)
        h.close()
        finals = [t for t in h.transcripts() if t["isFinal"]]
        assert finals
        for final in finals:
            [alternative] = final["alternatives"]
            assert alternative["languages"] == [expected]
            assert all(t["language"] == expected for t in alternative["interpretations"][0]["tokens"])


def test_verbose_json_language_is_the_one_spoken_longest() -> None:
    def seg(start: float, end: float, text: str, language: str | None) -> p.TranscriptSegment:
        return p.TranscriptSegment("i", start, end, text, None, None, -0.1, 0.0, language=language)

    segments = [seg(0, 2, "Hello there", "en"), seg(2, 7, "Guten Tag, wie geht es", "de"), seg(7, 8, "", "fr")]
    assert file_language(segments) == "de"
    assert file_language([]) is None
    assert FileOptions().reported_language("de") == "german"
    assert FileOptions().reported_language(None) == "english"
    given = FileOptions()
    given._set_language("fr")
    assert given.reported_language("de") == "french", "a language in the request is what was decoded"


# --------------------------------------------------------------------------------------------
# The real base model through the real server, on the corpus's non-English clips
# --------------------------------------------------------------------------------------------


def _clips(languages: Sequence[str]) -> list[str]:
    """Clip ids per language with a reference, shortest first (one per language keeps it quick)."""
    rows = manifest()
    chosen: dict[str, str] = {}
    for row in sorted(rows.values(), key=lambda r: r["duration_s"]):
        if row["language"] in languages and row["text"] and row["language"] not in chosen and row["duration_s"] <= 10:
            chosen[row["language"]] = row["id"]
    return [chosen[lang] for lang in languages if lang in chosen]


@pytest.fixture(scope="module")
def base_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_speech()
    if not base_available():
        pytest.skip("model 'base' needs the optional packages: pip install 'stream-server[base]'")
    srv = start_server(tmp_path_factory.mktemp("lang"), "--model", "base", timeout=300)
    yield srv
    srv.stop()


async def _segments(url: str, audio: np.ndarray, **session: Any) -> list[dict[str, Any]]:
    """Stream ``audio`` (with silence around it) at real time in 100 ms frames, with
    ``language: null``; the segments of the session. Real time, because that is the pace at which
    an utterance's settled language reaches the next utterances of the stream."""
    import websockets

    pcm = (np.clip(np.concatenate([silence(0.5), audio, silence(1.0)]), -1, 1) * 32767).astype("<i2").tobytes()
    segments: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {"language": None, "model": "base", **session}}))
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), 3200)):
            await ws.send(pcm[offset : offset + 3200])
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.1 - time.monotonic()))
        await ws.send(json.dumps({"type": "session.close"}))
        async for message in ws:
            event = json.loads(message)
            if event["type"] == "transcript.segment":
                segments.append(event)
            assert event["type"] != "error", event
    return segments


NON_ENGLISH = ("de", "es", "fr", "it", "pt", "ru", "ja", "ko", "zh")


@pytest.mark.slow
def test_base_model_reports_each_clips_language(base_server: ServerProcess) -> None:
    """Every segment of each non-English clip (one per language in the corpus) reports the clip's
    language, and English clips say ``en``."""
    english = [r["id"] for r in sorted(manifest().values(), key=lambda r: r["duration_s"])
               if r["language"] == "en" and r["text"] and 3 <= r["duration_s"] <= 8][:2]
    clips = _clips(NON_ENGLISH) + english
    assert len(clips) >= 5, clips
    wrong: list[str] = []
    for clip in clips:
        expected = manifest()[clip]["language"]
        segments = [s for s in asyncio.run(_segments(base_server.ws_url, load_clip(clip))) if s["text"]]
        assert segments, f"{clip}: no text"
        wrong += [f"{clip}: {s['language']} for {s['text']!r}" for s in segments if s["language"] != expected]
    assert not wrong, wrong


#: Words each clip's English translation by ``base`` has (its source words do not), read from the
#: clips' references: "Der hinter diesem Portal liegenden Raum ...", "Las arenas son blanquecinas
#: de grano medio ...", "Sous le consulat il devient conservateur ...".
TRANSLATED = {"de": ("portal", "room"), "es": ("sand", "grain"), "fr": ("consul",)}


def _english(text: str, expected: Sequence[str], source: str) -> bool:
    words = text.lower()
    return all(word in words for word in expected) and source.split()[0].lower() not in words.split()


@pytest.mark.slow
def test_base_model_translates_files_and_live_speech_to_english(base_server: ServerProcess) -> None:
    """``POST /v1/audio/translations`` through the OpenAI SDK, and a live session with
    ``task: "translate"``: English text, while the segments still report the speech's language."""
    import openai

    client = openai.OpenAI(base_url=base_server.http_url + "/v1", api_key="unused", max_retries=0)
    clips = dict(zip(TRANSLATED, _clips(tuple(TRANSLATED)), strict=True))
    for language, clip in clips.items():
        source = manifest()[clip]["text"]
        with open(require_speech() / manifest()[clip]["path"], "rb") as f:
            answer = client.audio.translations.create(model="whisper-1", file=f, response_format="verbose_json")
        assert answer.language == "english" and answer.model_extra["task"] == "translate"
        assert _english(answer.text, TRANSLATED[language], source), (clip, answer.text)
    clip = clips["de"]
    segments = [s for s in asyncio.run(_segments(base_server.ws_url, load_clip(clip), task="translate")) if s["text"]]
    text = " ".join(s["text"] for s in segments)
    assert _english(text, TRANSLATED["de"], manifest()[clip]["text"]), text
    assert {s["language"] for s in segments} == {"de"}, "the speech's language, not the text's"
