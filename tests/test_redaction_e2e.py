"""End to end: redaction through real clients, on real voices reading a card number.

The card is read digit by digit by FSDD's speakers, between two sentences of ARCTIC and LJ
Speech (``tests.support.spoken_card_call``). A Deepgram SDK user asks for ``redact=pci``, live and
pre-recorded; an OpenAI SDK user asks for nothing on a server run with ``--redact ssn``. No
message, interim or final, and no stored transcript may hold more of the card than PCI DSS lets
a receipt show (the first six digits); the words after the card must still come.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from stream_server.redaction import without_placeholders
from tests.http_api_support import write_wav
from tests.support import ServerProcess, require_speech, spoken_card_call, spoken_digits, start_server
from tests.test_deepgram_e2e import Run, environment, final_transcript, finals, sdk_stream

#: Digits a transcript may still show of a card: PCI DSS lets the first six be displayed (a turn
#: that ended in the pause after them leaves them as said, ``protocol.md``, "Redaction").
SHOWN_DIGITS = 6
#: ... and what one live message may show at most: never a whole card (12 digits or more). Live,
#: a turn can end between two groups when the hypothesis at that pause ended in misheard words,
#: and the group before it then goes out as said; how often is what ``bench --replay --numbers``
#: measures (docs/benchmarks.md, "Spoken numbers and redaction"), not a pass/fail of one draw.
LIVE_SHOWN_DIGITS = 11


def digits_shown(text: str) -> int:
    return len(re.findall(r"\d", without_placeholders(text)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_speech()
    srv = start_server(tmp_path_factory.mktemp("redaction-server"), "--redact", "ssn")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def card_wav(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    require_speech()
    path = tmp_path_factory.mktemp("card") / "card.wav"
    write_wav(spoken_card_call(), path)
    return path.read_bytes()


def test_pre_recorded_redact_pci_through_the_sdks_transcribe_file(server: ServerProcess, card_wav: bytes) -> None:
    from deepgram import DeepgramClient

    client = DeepgramClient(api_key="test-key", environment=environment(server))
    plain = client.listen.v1.media.transcribe_file(request=card_wav, model="nova-3", smart_format=True)
    said = plain.results.channels[0].alternatives[0].transcript
    print(f"without redact: {said}")
    assert digits_shown(said) >= 12, "the premise: the card is heard as digits"
    response = client.listen.v1.media.transcribe_file(request=card_wav, model="nova-3", smart_format=True, redact=["pci"])
    [alternative] = response.results.channels[0].alternatives
    print(f"redact=pci: {alternative.transcript}")
    assert "[CREDIT_CARD_1]" in alternative.transcript
    assert digits_shown(alternative.transcript) <= SHOWN_DIGITS
    assert "surpassed" in alternative.transcript.lower(), "the sentence after the card is kept"
    card = [w for w in alternative.words if "CREDIT_CARD" in (w.punctuated_word or "")]
    assert card and card[0].word == "[credit_card_1]" and card[0].end - card[0].start > 2.0
    assert sum(digits_shown(w.word) for w in alternative.words) <= SHOWN_DIGITS
    with pytest.raises(Exception) as refused:
        client.listen.v1.media.transcribe_file(request=card_wav, model="nova-3", redact=["pii"])
    assert getattr(refused.value, "status_code", None) == 400 and "'pii' is not a redaction" in str(refused.value)


def test_live_redact_pci_holds_the_card_out_of_every_interim_final_and_stored_transcript(server: ServerProcess) -> None:
    require_speech()
    audio = spoken_card_call()
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    run: Run = asyncio.run(sdk_stream(server, pcm, 16000, 2, encoding="linear16", interim_results="true", punctuate="true", redact="pci"))
    assert run.error is None, run.error
    results = run.of("Results")
    shown = [final_transcript(g) for g in results]
    print("\n".join(f"{'final  ' if g.message['is_final'] else 'interim'} {final_transcript(g)}" for g in results))
    assert [t for t in shown if digits_shown(t) > LIVE_SHOWN_DIGITS] == []
    for g in results:
        words = g.message["channel"]["alternatives"][0]["words"]
        assert sum(digits_shown(w["word"]) for w in words) <= LIVE_SHOWN_DIGITS
    text = " ".join(final_transcript(g) for g in finals(run))
    assert "[CREDIT_CARD_1]" in text and digits_shown(text) <= LIVE_SHOWN_DIGITS
    assert "surpassed" in text.lower()
    stored = stored_transcript(server, str(run.request_id))
    assert "[CREDIT_CARD_1]" in stored and digits_shown(stored) == digits_shown(text), stored


def stored_transcript(server: ServerProcess, session_id: str) -> str:
    with httpx.Client(base_url=server.http_url, timeout=10) as http:
        for _ in range(50):  # the finished session is stored as the socket closes
            response = http.get(f"/v1/sessions/{session_id}/transcript")
            if response.status_code != 404:
                break
            time.sleep(0.1)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return " ".join(c["text"] for c in body["channels"])


def test_the_servers_redact_applies_to_a_client_that_asks_for_nothing(server: ServerProcess, tmp_path: Any) -> None:
    """``--redact ssn``: an OpenAI SDK user, who has no way to ask, gets the social security
    number read out (nine digits, real voices) as a placeholder."""
    import openai

    quiet = np.zeros(8000, np.float32)
    path = tmp_path / "ssn.wav"
    write_wav(np.concatenate([quiet, spoken_digits("536 90 4217", group_gap_s=0.15), quiet]), path)
    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)
    with path.open("rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f).text
    print(f"--redact ssn: {text!r}")
    assert "[SSN_1]" in text and digits_shown(text) == 0
    buffer = io.BytesIO(path.read_bytes())
    buffer.name = "ssn.wav"
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        verbose = http.post("/v1/audio/transcriptions", files={"file": buffer}, data={"response_format": "verbose_json"}).json()
    assert all(digits_shown(s["text"]) == 0 for s in verbose["segments"])
