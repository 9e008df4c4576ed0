"""End to end: the official ``deepgram-sdk``'s Flux client (``client.listen.v2.connect``), unmodified,
against the real server at ``/v2/listen``: real speech at real time, turns with eager end of turn,
a mid-stream Configure, then CloseStream."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from deepgram import AsyncDeepgramClient

from tests.support import ServerProcess, english_references, require_speech, start_server, wer
from tests.test_deepgram_e2e import FRAME_S, Run, collect, environment, paced
from tests.test_dialect_deepgram_flux import check_turns, sdk_validate
from tests.test_server import build_long_stream


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_speech()
    srv = start_server(tmp_path_factory.mktemp("flux-server"))
    yield srv
    srv.stop()


def flux_message(message: Any) -> dict[str, Any]:
    """What the SDK handed the application, as JSON, validated strictly against its model."""
    return sdk_validate(json.dumps(message.model_dump(mode="json", exclude_unset=True)))


async def flux_stream(server: ServerProcess, pcm: bytes, **options: Any) -> Run:
    client = AsyncDeepgramClient(api_key="test-key", environment=environment(server))
    run = Run([])
    async with client.listen.v2.connect(model="flux-general-en", encoding="linear16", sample_rate=16000, **options) as connection:
        start = time.monotonic()
        task = asyncio.create_task(collect(connection, run, start, parse=flux_message))
        await connection.send_configure({"type": "Configure", "keyterms": ["Gothic"]})
        await paced(connection.send_media, pcm, int(16000 * FRAME_S) * 2, start)
        run.marks["close_stream"] = time.monotonic() - start
        await connection.send_close_stream()
        await asyncio.wait_for(task, timeout=60)
    return run


def test_the_sdks_flux_client_gets_one_turn_per_sentence_with_eager_ends(server: ServerProcess) -> None:
    rows = [r for r in english_references() if r["kind"] == "read" and 3.0 < r["duration_s"] < 8.0]
    clips = random.Random(21).sample(rows, 5)
    audio, spans = build_long_stream(clips, seed=9)
    audio = np.concatenate([audio, np.zeros(16000, np.float32)])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    run = asyncio.run(flux_stream(server, pcm, eager_eot_threshold="0.5"))
    assert run.error is None, run.error
    messages = [g.message for g in run.messages]
    assert messages[0]["type"] == "Connected" and messages[0]["request_id"]
    assert [m["type"] for m in messages].count("ConfigureSuccess") == 1
    ends = check_turns(messages)
    text = " ".join(m["transcript"] for m in ends)
    error = wer([r["text"] for r in clips], [text])
    # End of turn after each sentence's last sample (audio went out at real time from t = 0).
    end_times = [g.at for g in run.messages if g.message.get("event") == "EndOfTurn"]
    eager_times = [g.at for g in run.messages if g.message.get("event") == "EagerEndOfTurn"]
    start_times = [g.at for g in run.messages if g.message.get("event") == "StartOfTurn"]
    started = [min((t for t in start_times if t > start), default=float("nan")) - start for start, _ in spans]
    after = [min((t for t in end_times if t > end), default=float("nan")) - end for _, end in spans]
    eager_after = [min((t for t in eager_times if t > end), default=float("nan")) - end for _, end in spans]
    print(f"Flux: {len(ends)} turns for {len(spans)} sentences, WER {error:.3f}; EndOfTurn after the sentence: "
          f"p50 {statistics.median(after):.2f} s; EagerEndOfTurn p50 {statistics.median(eager_after):.2f} s; "
          f"StartOfTurn after the sentence starts: p50 {statistics.median(started):.2f} s\n{text}")
    assert error <= 0.15, text
    # A turn per sentence; a read sentence's comma pause (over 500 ms at Flux's default threshold)
    # may split one in two.
    assert len(spans) - 1 <= len(ends) <= 2 * len(spans)
    assert eager_times, "eager_eot_threshold: EagerEndOfTurn before EndOfTurn"
    assert len([t for t in end_times if t < run.marks["close_stream"]]) >= len(spans) - 1, "turns end while the stream goes on"

