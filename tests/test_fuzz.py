"""Property-based fuzzing of every dialect and of the session core, CI-sized.

The strategies and the rig live in ``stream_server/bench/fuzz.py`` (a dialect in front of a real
core session with a deterministic VAD and decoder; see its docstring for the properties checked).
Here they run derandomized with a few hundred examples, so a failure reproduces on every run and
Hypothesis shrinks it to a minimal case; ``stream-server bench --fuzz 100000`` is the long run.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_server.bench import fuzz

CI = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def check(case: fuzz.Case) -> None:
    result = fuzz.run_case(case)
    assert result.crash is None, f"{result.crash}\n{result.crash_trace}"
    assert result.finding is None, f"{result.finding}: {result.finding_detail}"


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_programs_keep_every_property(target: str) -> None:
    """Random interleavings of protocol messages, garbage, audio and decode answers."""

    @CI
    @given(fuzz.cases_for(target))
    def run(case: fuzz.Case) -> None:
        check(case)

    run()


@pytest.mark.parametrize("dialect", fuzz.DIALECTS)
def test_single_frames_get_a_defined_outcome(dialect: str) -> None:
    """Arbitrary text and bytes, alone, right after the connection opens."""

    @settings(CI, max_examples=80)
    @given(st.one_of(st.builds(fuzz.RawText, fuzz.garbage_text), st.builds(fuzz.Bytes, st.binary(max_size=300))))
    def run(step: fuzz.Step) -> None:
        setup = {"query": {"encoding": "linear16", "sample_rate": "16000"}} if dialect == "deepgram" else {}
        check(fuzz.Case(dialect, setup, (step,)))

    run()


HUGE_INTEGER = "1" * 5000  # more digits than Python converts (sys.get_int_max_str_digits(): 4300)


@pytest.mark.parametrize("dialect", fuzz.DIALECTS)
def test_a_huge_json_number_is_answered_not_raised(dialect: str) -> None:
    setup = {"query": {"encoding": "linear16", "sample_rate": "16000"}} if dialect == "deepgram" else {}
    check(fuzz.Case(dialect, setup, (fuzz.RawText(HUGE_INTEGER), fuzz.RawText('{"type":' + HUGE_INTEGER + "}"))))


def test_session_parser_answers_a_huge_json_number() -> None:
    check(fuzz.Case("session", {}, (fuzz.RawText('{"type":"session.update","session":{"sample_rate":' + HUGE_INTEGER + "}}"),)))


def audiohook_message(kind: str, parameters: dict[str, object], position: object = None) -> fuzz.Msg:
    envelope = fuzz.audiohook_envelope(kind, parameters)
    if position is not None:
        envelope["position"] = position
    return fuzz.Msg(envelope)


AUDIOHOOK_OPEN = audiohook_message("open", {
    "organizationId": "o", "conversationId": "c",
    "media": [{"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}],
})


@pytest.mark.parametrize("position", ["PT999999999999999999999999999999S", "PT" + "9" * 400 + "S", "PT" + "9" * 5000 + "H"])
def test_audiohook_survives_an_absurd_position(position: str) -> None:
    """A position far beyond any call (or beyond float range) must not break later transcripts."""
    check(fuzz.Case("audiohook", {}, (
        AUDIOHOOK_OPEN,
        audiohook_message("discarded", {"start": "PT0S", "discarded": "PT1S"}, position),
        fuzz.Frames(fuzz.AudioSpec(words=(1, 2), tail_ms=900)),
        fuzz.Tick(20),
        audiohook_message("close", {"reason": "end"}),
    )))


def test_the_rig_reaches_deep_protocol_states() -> None:
    """Guard against a fuzzer that only ever sees garbage: real sessions with speech happen.

    Over several seeds: one chunk of 200 cases holds ~40 per dialect, and whether one of them opens
    a dialect's session properly is luck (seed 1 once reached AudioHook audio, later not, with
    the same strategies); 800 cases reach every one."""
    reached: set[str] = set()
    for seed in range(1, 5):
        reached |= {outcome for outcome, count in fuzz.run_chunk(seed=seed, count=200).outcomes.items() if count}
    # Hypothesis mines literal constants from every loaded module to bias its draws, so what a
    # seed generates depends on which tests ran first: a clean CI run's seeds 1-4 drew no AudioHook
    # open that led to audio, while the same seeds here did. The rig's AudioHook path to audio is
    # also played from a scripted open, so this guard does not hang on that luck.
    scripted = fuzz.run_case(fuzz.Case("audiohook", {}, (AUDIOHOOK_OPEN, fuzz.Frames(fuzz.AudioSpec(words=(1, 2), tail_ms=300)))))
    assert scripted.crash is None and scripted.finding is None
    reached |= {outcome for outcome, count in scripted.outcomes.items() if count}
    for outcome in ("native:command AudioAppend", "openai:command SessionUpdate", "twilio:command AudioAppend",
                    "audiohook:command AudioAppend", "deepgram:command AudioAppend", "session:accepted"):
        assert outcome in reached, outcome


@pytest.mark.parametrize("outcome", ["decode_failed", "model_unavailable"])
def test_no_event_after_done_when_an_interim_decode_fails_late(outcome: str) -> None:
    """close() → the final is answered → done; then the interim still in flight fails."""
    check(fuzz.Case("session", {}, (
        fuzz.CoreAudio(fuzz.AudioSpec(words=(1, 2, 3, 4), gap_ms=100)),
        fuzz.CoreCommand("close"),
        fuzz.Answer(1, "result"),
        fuzz.Answer(0, outcome),
    ), latencies=(100,)))


@pytest.mark.parametrize("lag", [0, 1])
def test_a_split_and_the_close_may_pass_the_pending_finals_bound_by_two(lag: int) -> None:
    """Found by the 100k run: a VAD that ends a turn at every gap fills the bound (8 finals), the
    turn that then runs on outgrows max_utterance_s and is split, and close finalizes the rest."""
    everything_is_speech = {"config": {"channels": 3, "turn_detection": {"type": "server_vad", "threshold": 0.0,
                                                                         "prefix_padding_ms": 765, "silence_duration_ms": 0}}}
    check(fuzz.Case("session", everything_is_speech, (
        fuzz.CoreAudio(fuzz.AudioSpec(words=(0, 6, 1, 0), gap_ms=303, tail_ms=625, cuts=(0.2,), channel_mask=2), channel=0),
        fuzz.CoreAudio(fuzz.AudioSpec(words=(6, 12, 11, 12), gap_ms=248, tail_ms=1316, cuts=(0.0, 0.1, 0.28, 0.88)), channel=0),
        fuzz.CoreAudio(fuzz.AudioSpec(words=(0, 6, 1, 0), gap_ms=303, tail_ms=625, cuts=(0.0, 0.0, 0.0, 0.0), channel_mask=2), channel=0),
    ), latencies=(6, 0, 0, 0), final_context_lag=lag))


@pytest.mark.parametrize("media", [
    {"type": "audio", "format": ["PCMU"], "channels": ["external"], "rate": 8000},
    {"type": "audio", "format": "PCMU", "channels": [["external"]], "rate": 8000},
])
def test_audiohook_open_with_unhashable_media_fields_is_bad_input(media: dict[str, object]) -> None:
    check(fuzz.Case("audiohook", {}, (audiohook_message("open", {"organizationId": "o", "conversationId": "c", "media": [media]}),)))


@pytest.mark.parametrize("sequenced", [False, True])
def test_twilio_logs_an_absurdly_nested_event_name_without_formatting_it(sequenced: bool) -> None:
    """Found by the 100k run: ``{"event": [[[...]]]}`` nested just shallower than ``json.loads`` refuses
    was logged with ``%r`` ("without sequenceNumber", "unknown event"), and repr() of it hit the
    recursion limit inside logging: the warning was lost and a traceback went to stderr. How deep
    exactly depends on the stack the dialect runs on, so a band of depths around the limit."""
    for depth in range(900, 1001):
        event: dict[str, object] = {"event": [fuzz.Raw(fuzz.deep_text(depth, "["))]}
        if sequenced:
            event["sequenceNumber"] = "1"
        check(fuzz.Case("twilio", {"api_keys": ()}, (fuzz.Msg(event),)))
