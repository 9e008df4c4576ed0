"""All server configuration in one object, fed from CLI flags and ``STREAM_SERVER_*`` variables.

Each limit says what it bounds, in the spirit of the ``websockets`` library's documented limits.
Precedence: CLI flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_server.redaction import names_from as redaction_names

ENV_PREFIX = "STREAM_SERVER_"


def _default_cache() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stream-server")


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = dataclasses.field(default=8000, metadata={"help": "TCP port (0 = pick a free one)"})
    model: str = dataclasses.field(
        default="tiny.en",
        metadata={"help": "default model: tiny.en (bundled), base (bundled, multilingual, needs the [base] extra), a faster-whisper name, or a CTranslate2 model directory"},
    )
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu, cuda or auto", "choices": ("cpu", "cuda", "auto")})
    compute_type: str = dataclasses.field(
        default="default", metadata={"help": "CTranslate2 compute type (default: int8 on CPU, float16 on CUDA)"}
    )
    timestamp_tokens: str = dataclasses.field(
        default="on",
        metadata={
            "help": "decode with Whisper timestamp tokens (on) or without (off: ~20x cheaper decoding steps on CUDA, "
            "but whole-corpus replay WER 7.9%% -> 9.8%%, 8 calls 7.8%% -> 8.3%%: text past the audio is cut by alignment only; for throughput tests)",
            "choices": ("on", "off"),
        },
    )
    cpu_threads: int = dataclasses.field(
        default=0, metadata={"help": "threads per decode worker on CPU (0 = the cores shared out among the workers)"}
    )
    decode_workers: int = dataclasses.field(
        default=0,
        metadata={"help": "decode worker threads, each running one batch at a time (0 = 2 on a CPU with 2+ cores, else 1; see the README)"},
    )
    max_batch_size: int = dataclasses.field(
        default=8, metadata={"help": "most decode requests in one model call (bounds model memory per batch)"}
    )
    pass_memory_mb: float = dataclasses.field(
        default=-1.0,
        metadata={
            "help": "bound on the encoder attention memory of one model pass, in MB: long windows then go in "
            "smaller batches (-1 = 16 on CPU, none on CUDA; 0 = none)"
        },
    )
    malloc_arenas: int = dataclasses.field(
        default=2,
        metadata={
            "help": "glibc malloc arenas for the server process (0 = glibc's default, 8 per core): few arenas reuse the "
            "decode passes' freed memory instead of keeping a high-water mark per thread (24 streams: RSS peak "
            "-140 MB, same latency; see the README); MALLOC_ARENA_MAX, when set, wins"
        },
    )
    interim_max_wait_s: float = dataclasses.field(
        default=1.0, metadata={"help": "interim decodes older than this are shed under load (finals never are)"}
    )
    # Measured by the decodes that end turns (finals and pause decodes), request to result. On a
    # 2-core host they averaged 0.26 s at 12 streams (final p95 1.07 s) and 0.52 s at 24 (final
    # p95 1.67-1.83 s, past the 1.5 s target): 0.4 refuses between the two. Finals' wait alone (the
    # measure before) refused no one at 32 streams, final p95 2.50 s (docs/benchmarks.md, "Admission control").
    admission_max_turn_end_s: float = dataclasses.field(
        default=0.4,
        metadata={
            "help": "refuse new sessions (server_busy) while the decodes that end turns (finals, pause decodes) take longer than this from request to result, recent average (0 = never)"
        },
    )
    # A turn's first interim is asked for ~0.4 s after the speaker begins (the VAD's onset and
    # ``first_interim_ms``); waiting a second more for it, that turn shows no text for 1.4 s.
    admission_max_first_text_s: float = dataclasses.field(
        default=1.0,
        metadata={
            "help": "also refuse new sessions while a turn has waited longer than this for its first text "
            "(its first interim decode, queued to now; 0 = not watched; --admission-max-turn-end-s 0 turns both off)"
        },
    )
    # The event loop runs every client's intake (parse, resample, VAD): once it is this late even
    # with the loaded intake step, every turn end is seen that much late whatever the decoders do.
    # Two cores: 24 two-leg calls ran 0.05-0.18 s late, 32 calls 0.9-2.2 s (docs/benchmarks.md, "Admission
    # on the event loop's lag").
    admission_max_loop_lag_ms: int = dataclasses.field(
        default=500,
        metadata={
            "help": "also refuse new sessions (server_busy) while the event loop runs this late or more (median of the last 2 s), until it is under half of this (0 = not watched)"
        },
    )
    interim_step_ms: int = dataclasses.field(
        default=300, metadata={"help": "new audio needed before an open utterance is decoded again"}
    )
    first_interim_ms: int = dataclasses.field(
        default=300,
        metadata={"help": "speech the VAD must hear after a turn's onset before the turn's first interim decode (shorter windows mostly decode to nothing; README)"},
    )
    interim_pace: float = dataclasses.field(
        default=3.0,
        metadata={"help": "under load, an utterance's next interim decode waits at least this many round trips of its last one (0 = no pacing)"},
    )
    interim_pace_loaded: float = dataclasses.field(
        default=4.0,
        metadata={"help": "the pace once an utterance's last interim round trip reaches --loaded-round-trip-ms (a server that far behind; at most --interim-pace: the same pace at every load; README)"},
    )
    loaded_round_trip_ms: int = dataclasses.field(
        default=300, metadata={"help": "interim round trip (audio ms judged while it was out) from which --interim-pace-loaded applies"}
    )
    pause_decode_ms: int = dataclasses.field(
        default=100,
        metadata={"help": "a pause this long in a turn is decoded at once (its words are committed once it lasts --stable-silence-ms); 200 (the default until 2026-12-04) makes last words final ~0.09 s later at the same accuracy over draws (README)"},
    )
    stable_silence_ms: int = dataclasses.field(
        default=200,
        metadata={"help": "a pause this long in a turn makes the words before it final (decoded from --pause-decode-ms on)"},
    )
    held_commit_ms: int = dataclasses.field(
        default=300,
        metadata={"help": "words a pause decode held back on a dissent (short turns) are made final as heard once the pause lasts this long, not at the turn's end (0 = at the turn's end; README)"},
    )
    min_commit_window_ms: int = dataclasses.field(
        default=3500,
        metadata={"help": "until a turn is this long, only words two decodes agree on are committed, at pauses too (lower: short turns' words final sooner, for some accuracy; README)"},
    )
    carry_gap_ms: int = dataclasses.field(
        default=1500,
        metadata={"help": "a short turn this soon after the last one is decoded as its continuation, after its last words (0 = never)"},
    )
    handover_pause_ms: int = dataclasses.field(
        default=200,
        metadata={"help": "in a session of several channels (call legs), a turn silent this long when another channel's speaker starts ends there, without waiting for the rest of turn_detection.silence_duration_ms (0 = never)"},
    )
    number_pause_ms: int = dataclasses.field(
        default=1200,
        metadata={"help": "with redaction on, a turn whose words so far end in a number ends only after this much silence (when longer than turn_detection.silence_duration_ms), so a card read in groups is judged whole (0 = off)"},
    )
    narrowband_padding_ms: int = dataclasses.field(
        default=200,
        metadata={"help": "input at 8 kHz or less (phone lines) starts each utterance this much before the VAD onset, on top of turn_detection.prefix_padding_ms: the onset comes late there and cut first words (README)"},
    )
    level_onset_reach_ms: int = dataclasses.field(
        default=1000,
        metadata={"help": "a turn's audio starts where its level rose, up to this far before the VAD's onset, when the VAD heard the first syllable late (0 = the padding only; README)"},
    )
    padding_from_level_ms: int = dataclasses.field(
        default=100,
        metadata={"help": "when a turn's sound began after its padding did (the padding held only noise), its audio starts this long before the sound instead: noise before a short word made the model misread it (0 = the padding as asked; README)"},
    )
    fresh_listen_prob: float = dataclasses.field(
        default=0.2,
        metadata={"help": "between turns, a frame the VAD puts at this probability or more is judged again by a fresh VAD state, which hears a short word after speech better (0 = off; README)"},
    )
    level_end_reach_ms: int = dataclasses.field(
        default=128,
        metadata={"help": "a turn's ending silence counts from where the level fell to the noise, up to this far before the VAD heard the silence (0 = from the VAD's silence; README)"},
    )
    intake_step_ms: int = dataclasses.field(
        default=0,
        metadata={"help": "process client audio in steps of at least this many ms (0 = as it arrives): less CPU per stream, up to a step more latency; 100 held 24 two-leg calls on 2 cores at a lower p95 (README)"},
    )
    narrowband_intake_step_ms: int = dataclasses.field(
        default=0,
        metadata={"help": "process input at 8 kHz or less (phone lines: Twilio, AudioHook, any 8 kHz stream) in steps of at least this many ms always (0 = --intake-step-ms only); --loaded-intake-step-ms already lengthens every session's step while the event loop is behind (README)"},
    )
    loaded_intake_step_ms: int = dataclasses.field(
        default=100,
        metadata={"help": "while the event loop runs --loaded-loop-lag-ms late or more, live sessions take audio in steps of at least this many ms, or of the loop's lag when longer (up to 400): fewer resampler and VAD calls for the same audio (0 = never; README)"},
    )
    loaded_loop_lag_ms: int = dataclasses.field(
        default=50,
        metadata={"help": "event-loop lateness (median of the last 2 s) from which sessions take audio in --loaded-intake-step-ms steps, until it falls under half of this (0 = never)"},
    )
    crosstalk_margin_db: float = dataclasses.field(
        default=20.0,
        metadata={"help": "with several channels (call legs), a channel this many dB under another's recent speech is hearing it (echo, bleed): its VAD hears silence there (0 = off; README)"},
    )
    max_utterance_s: float = dataclasses.field(
        default=15.0, metadata={"help": "split utterances longer than this (bounds decode window and buffer memory)"}
    )
    max_message_bytes: int = dataclasses.field(
        default=1 << 20, metadata={"help": "largest WebSocket message accepted; bigger ones close the session with 1009"}
    )
    max_sessions: int = dataclasses.field(
        default=64, metadata={"help": "concurrent sessions; more are refused with close code 1013"}
    )
    idle_timeout_s: float = dataclasses.field(
        default=60.0, metadata={"help": "close sessions that send nothing for this long (0 = never)"}
    )
    max_file_bytes: int = dataclasses.field(
        default=25 * 1024 * 1024, metadata={"help": "largest upload to the HTTP transcription API"}
    )
    cache_dir: str = dataclasses.field(default_factory=_default_cache, metadata={"help": "where assembled models are kept"})
    log_level: str = dataclasses.field(default="info", metadata={"help": "debug, info, warning or error"})
    drain_timeout_s: float = dataclasses.field(
        default=30.0,
        metadata={"help": "on SIGTERM: how long open sessions get to finalize their utterances and receive done (close 1001) before the server exits"},
    )
    max_send_queue: int = dataclasses.field(
        default=2000,
        metadata={"help": "events queued for a client that is not reading; past this it is closed (1008) so it cannot pin memory"},
    )
    max_messages_per_s: float = dataclasses.field(
        default=1000.0,
        metadata={"help": "messages a WebSocket client may send per second (bursts of twice that); beyond it: rate_limited and close 1008, unless the client is ahead of real time (a file sent fast), which is read at this rate instead"},
    )
    api_keys: str = dataclasses.field(
        default="",
        metadata={"help": "comma-separated API keys clients must present (empty, and no --api-keys-file: no authentication; keys clients send are ignored)"},
    )
    api_keys_file: str = dataclasses.field(
        default="",
        metadata={"help": "file of API keys, one a line, each optionally with name=, max_sessions= and audio_s_per_min= (docs/deploy.md); kept hashed in memory, reloaded on SIGHUP"},
    )
    key_max_sessions: int = dataclasses.field(
        default=0,
        metadata={"help": "concurrent WebSocket sessions per API key (0 = unlimited; a key's max_sessions= overrides; without keys: all clients together); more are refused with HTTP 429"},
    )
    key_audio_s_per_min: float = dataclasses.field(
        default=0.0,
        metadata={"help": "audio seconds per minute per API key over all its sessions (0 = unlimited; audio_s_per_min= overrides; without keys: all clients together); beyond it the session's audio so far is finalized, then rate_limited and close 1008"},
    )
    allowed_origins: str = dataclasses.field(
        default="",
        metadata={"help": "comma-separated origins (https://app.example.com) whose pages may open WebSockets; others get 403; requests without Origin are allowed; empty = any"},
    )
    # Live and stored session transcripts (GET /v1/sessions/{id}/...) and webhooks.
    transcript_db: str = dataclasses.field(
        default="auto",
        metadata={"help": "SQLite file where finished call transcripts are kept (auto: transcripts.sqlite3 in --cache-dir; empty: not stored)"},
    )
    transcript_retention_days: float = dataclasses.field(
        default=30.0, metadata={"help": "delete stored transcripts this many days after their session ended (0 = keep forever)"}
    )
    webhook_url: str = dataclasses.field(
        default="", metadata={"help": "POST each final segment and each session end as JSON to this URL (empty: no webhooks)"}
    )
    webhook_secret: str = dataclasses.field(
        default="", metadata={"help": "sign webhook bodies with HMAC-SHA256 of this secret (X-Stream-Server-Signature)"}
    )
    webhook_timeout_s: float = dataclasses.field(default=5.0, metadata={"help": "timeout of one webhook attempt"})
    webhook_max_attempts: int = dataclasses.field(
        default=5, metadata={"help": "attempts per webhook payload (exponential backoff between them) before it is dropped"}
    )
    # Redaction every session gets, whatever its client asks (redaction.py).
    redact: str = dataclasses.field(
        default="",
        metadata={"help": "redact these in every session's transcripts, comma-separated: pci (card numbers, expiry dates, security codes), ssn, numbers (any 3+ digits), or credit_card, credit_card_expiration, cvv; clients can add kinds, not remove these (empty: only what a client asks)"},
    )
    # URLs that requests name: Deepgram's {"url": ...} audio and callback= (request_urls.py, callbacks.py).
    request_urls: str = dataclasses.field(
        default="public",
        metadata={
            "help": "which URLs a request may name for the server to reach (audio to fetch, callbacks): public (hosts with public addresses only), any (private and loopback too), off",
            "choices": ("public", "any", "off"),
        },
    )
    request_url_timeout_s: float = dataclasses.field(
        default=120.0, metadata={"help": "longest time fetching a request's audio URL may take in all"}
    )
    callback_retries: int = dataclasses.field(
        default=10, metadata={"help": "times a failed callback delivery is tried again (as Deepgram does)"}
    )
    callback_retry_s: float = dataclasses.field(
        default=30.0, metadata={"help": "seconds between a failed callback delivery and the next try"}
    )
    # Twilio Media Streams and TLS (Twilio only connects to wss:// URLs).
    twilio_auth_token: str = dataclasses.field(
        default="",
        metadata={"help": "Twilio auth token: /v1/twilio upgrades must carry a valid X-Twilio-Signature (empty: not checked; prefer the environment variable to a flag)"},
    )
    twilio_public_url: str = dataclasses.field(
        default="",
        metadata={"help": "the <Stream> URL exactly as the TwiML has it (wss://stt.example.com/calls/stream): what X-Twilio-Signature is checked against, for a proxy that rewrites the path or host (empty: rebuilt from Host/X-Forwarded-Host and the path)"},
    )
    ssl_certfile: str = dataclasses.field(
        default="", metadata={"help": "TLS certificate chain (PEM): serve https:// and wss:// directly (empty: plain HTTP, e.g. behind a TLS proxy)"}
    )
    ssl_keyfile: str = dataclasses.field(
        default="", metadata={"help": "private key (PEM) of --ssl-certfile, unless that file holds the key too"}
    )
    # Genesys Cloud AudioHook Monitor (/v1/audiohook).
    audiohook_client_secret: str = dataclasses.field(
        default="",
        metadata={"help": "AudioHook client secret (base64, as Genesys shows it): /v1/audiohook upgrades must carry a valid HMAC-SHA256 signature made with it (empty: not checked; prefer the environment variable to a flag)"},
    )

    # Several replicas behind a load balancer (deploy/, docs/deploy.md).
    redis_url: str = dataclasses.field(
        default="",
        metadata={"help": "Redis as the shared session bus (redis://host:6379/0): every session's events and transcript are published there, so /v1/sessions/{id}/events and /transcript answer on any replica, and per-key limits count every replica's sessions and audio (empty: in-process only)"},
    )

    def redact_names(self) -> tuple[str, ...]:
        """``--redact`` as names; raises ValueError naming one that is not a redaction kind."""
        try:
            return tuple(redaction_names([self.redact]))
        except ValueError as exc:
            raise ValueError(f"--redact: {exc}") from None

    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    def transcript_db_path(self) -> Path | None:
        """Where transcripts are stored, or None when storing is switched off."""
        if not self.transcript_db.strip():
            return None
        if self.transcript_db == "auto":
            return Path(self.cache_dir).expanduser() / "transcripts.sqlite3"
        return Path(self.transcript_db).expanduser()

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        try:
            import ctranslate2

            return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        except Exception:  # noqa: BLE001 - no CUDA runtime means CPU
            return "cpu"

    def decoder_options(self) -> dict[str, Any]:
        """The production decoder's keyword arguments (``WhisperDecoder``), resolved once, so the
        server and the in-process benchmark load the same decoder."""
        return {
            "device": self.resolved_device(),
            "compute_type": self.resolved_compute_type(),
            "cpu_threads": self.resolved_cpu_threads(),
            "num_workers": self.resolved_decode_workers(),
            "timestamp_tokens": self.resolved_timestamp_tokens(),
            "pass_memory_mb": self.resolved_pass_memory_mb(),
        }

    def resolved_pass_memory_mb(self) -> float:
        """16 MB per pass on CPU, where RSS per stream is the budget and batching long windows
        saves no CPU (see ``decoding.ENCODER_FRAMES_PER_SECOND``). 24 live streams, one run each,
        glibc's default arenas: RSS peak 496-508 MB unbounded (8.1-8.3 MB per added stream),
        479 MB at 64 MB (7.4), 463 MB at 32 MB (6.7). With two malloc arenas (``malloc_arenas``):
        393-432 MB at 32 MB (6.0-7.4), 362-363 MB at 16 MB (4.3-4.5); with one: 379-389 MB at
        32 MB (5.4-5.9), 336-348 MB at 16 MB (3.8-4.5), 325 MB at 8 MB (3.7, but batches of 1.3
        requests on average instead of 1.8). CPU 0.080-0.081 s per audio second and final p95
        within run-to-run noise throughout. Unbounded on CUDA, where big batches are the
        throughput."""
        if self.pass_memory_mb >= 0:
            return self.pass_memory_mb
        return 0.0 if self.resolved_device() == "cuda" else 16.0

    def resolved_timestamp_tokens(self) -> bool:
        return self.timestamp_tokens == "on"

    def resolved_decode_workers(self) -> int:
        """Two workers of one thread each on a CPU with two or more cores, else one.

        On the 2-core CPU they serve more live streams than one worker on both cores (24
        real-time streams, quiet machine: final p50 0.98-1.06 s vs 1.46-1.48, first text p50
        1.06-1.19 s vs 1.84-1.86; one stream unchanged): while one batch is in the model the
        other's Python (features, word guards) runs. They used to make a file's text depend on
        timing (its turns' context was whatever had been decoded before them); a file's context is
        now fixed (``engine.FILE_CONTEXT_LAG``), so the same file reads the same with one or two.
        On a GPU one worker keeps the device's batches whole."""
        if self.decode_workers > 0:
            return self.decode_workers
        if self.resolved_device() == "cuda":
            return 1
        return 2 if (os.cpu_count() or 1) >= 2 else 1

    def resolved_cpu_threads(self) -> int:
        """Each worker's share of the cores (all of them for one worker): two workers that each
        used every core oversubscribed them (24 streams: final p95 2.49 s vs 2.33-2.56 s with one
        thread each, more RSS)."""
        if self.cpu_threads > 0:
            return self.cpu_threads
        return max(1, (os.cpu_count() or 1) // self.resolved_decode_workers())

    def resolved_compute_type(self) -> str:
        if self.compute_type != "default":
            return self.compute_type
        return "float16" if self.resolved_device() == "cuda" else "int8"


def _convert(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "str": str}[field.type]
    return kind(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.name.upper()
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": None,
            "help": f"{field.metadata.get('help', '')} [env {env}]",
            "type": lambda raw, f=field: _convert(f, raw),
        }
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def from_sources(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        cli = getattr(args, field.name, None) if args is not None else None
        env = environ.get(ENV_PREFIX + field.name.upper())
        if cli is not None:
            values[field.name] = cli
        elif env is not None:
            values[field.name] = _convert(field, env)
    return Settings(**values)


def parse(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="stream-server")
    add_arguments(parser)
    return from_sources(parser.parse_args(argv))
