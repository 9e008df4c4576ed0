"""Soak test: ``stream-server bench --soak 30m --clients 8``.

A server that is fine for one 8-minute benchmark can still leak: a file descriptor per closed
WebSocket, a thread per session, a few kilobytes of RSS per utterance, a queue that grows by one
entry a minute. None of that shows until sessions have opened and closed by the hundreds, which is
what production does all day. This mode does that on purpose and measures the trend:

* **Load.** ``--clients`` concurrent clients, each running *sessions back to back*: connect,
  ``session.update``, a few real-speech clips (``--soak-session-s`` of audio, natural pauses)
  paced at real time, ``session.close``, wait for ``transcript.text.done`` and the close, then
  reconnect at once. A session the server refuses (``server_busy``: at capacity, admission control)
  is counted as a refusal, not scored, and the client backs off (1, 2, 4, 8 s) as a production
  client would. Sessions cycle through a fixed list of session plans (:data:`PLANS` streams
  built by the bench's own corpus code), so each third of the run plays the same material and a
  change in WER between thirds is drift, not different audio.
* **Resources.** Every ``--soak-sample-s`` the server process is sampled: RSS of its process tree,
  open file descriptors (``/proc/PID/fd``), threads, CPU seconds, the ``stream_active_sessions``
  gauge, and the machine's load average (the soak shares the machine, so the load is evidence).
  The RSS slope is a least-squares fit in MB/hour over the samples after ``--soak-warmup-s``
  (allocator pools, model caches and the transcript store's first pages grow early and then stop;
  the warm-up keeps them out of the slope).
* **Correctness over time.** Every session is scored as the stream bench scores a stream
  (:func:`~stream_server.bench.metrics.evaluate_stream`). A *lost final* is the server losing text:
  an utterance it announced (``speech_started``) that never got its ``transcript.segment``, or a
  session that never got ``transcript.text.done``. Apart from those, a clip of which no word reached
  the final text is counted as a *clip without text* and classed by where its speech fell: inside a
  finalized utterance (the decoder left it out: Whisper drops an isolated spoken digit now and then)
  or in no utterance at all (the VAD did not hear it). WER and finalization latency are pooled per
  time window and compared first third vs last third.

``results.json`` keeps every sample and a compact row per session; ``summary.md`` has the
headline table. The exit status is 1 when a final was lost or the server died.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import itertools
import json
import os
import platform
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import server_metrics
from .client import ClientConfig, StreamRecord, is_refusal, run_client
from .corpus import DEFAULT_PAUSE_FILL, DEFAULT_PAUSE_RANGE_S, SAMPLE_RATE, Stream, _assemble, eligible_clips, prepare_clips, select_pool
from .metrics import ZERO_COUNTS, WerCounts, evaluate_stream, least_squares_slope, percentile
from .report import write_json
from .server_proc import ResourceMonitor, ServerOptions, ServerProcess

#: Distinct session plans cycled through (each a different seeded choice and order of clips).
PLANS = 24
#: At most this many sessions get their raw events written out for inspection: failed ones (a lost
#: final, a broken connection) and ones with a clip without text (accuracy).
MAX_PROBLEM_DUMPS = {"failed": 50, "missed": 10}
#: Back-off after a refused or broken session: doubles from the first to the last, reset on success.
BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|m|h)?\s*$")
_UNIT_S = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"40s"``, ``"30m"``, ``"2h"`` or plain seconds (``"90"``) → seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 40s, 30m, 2h)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass
class SoakConfig:
    """What a soak run does; built from the bench's command line by :func:`main_soak`."""

    duration_s: float
    clients: int
    corpus: Path
    session_s: float = 20.0
    sample_s: float = 10.0
    warmup_s: float | None = None  # None: 20% of the run, at most 5 minutes
    seed: int = 0
    pause_range_s: tuple[float, float] = DEFAULT_PAUSE_RANGE_S
    fill: str = DEFAULT_PAUSE_FILL

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(300.0, 0.2 * self.duration_s)


# ============================================================================================
# Sessions
# ============================================================================================


def build_plans(cfg: SoakConfig, count: int = PLANS) -> list[Stream]:
    """``count`` session streams of about ``cfg.session_s`` seconds each, from the bench corpus.

    The clips are read and trimmed once (:func:`~stream_server.bench.corpus.prepare_clips`);
    each plan is a different seeded choice of clips (:func:`select_pool`) assembled with the
    stream bench's own pauses and noise fill, so a soak session is a short bench stream.
    """
    prepared = prepare_clips(eligible_clips(cfg.corpus), SAMPLE_RATE)
    if not prepared:
        raise ValueError(f"no eligible English clips with human references under {cfg.corpus}")
    mean_pause = sum(cfg.pause_range_s) / 2
    plans = []
    for k in range(count):
        pool = select_pool(prepared, cfg.session_s, cfg.seed * 1000 + k, mean_pause)
        plans.append(_assemble(k, pool, SAMPLE_RATE, cfg.seed, cfg.pause_range_s, cfg.fill))
    return plans


@dataclass
class SessionOutcome:
    """One finished session, scored (what results.json keeps per session)."""

    number: int
    client: int
    plan: int
    started_s: float  # since the soak's clients started
    ended_s: float
    audio_s: float
    utterances: int
    clips: list[str]
    unfinalized_items: int  # speech_started without its transcript.segment: text the server lost
    got_done: bool
    lost_clips: list[str]  # no word of the clip in the final text (accuracy, see the module doc)
    lost_clips_unheard: int  # of those, clips whose speech fell in no finalized utterance
    wer: WerCounts
    finalization_latencies: list[float]
    close_code: int | None
    error: str | None
    problems: list[str]
    frames_sent: int
    frames_late: int
    send_lag_max_s: float

    @property
    def lost_finals(self) -> int:
        return self.unfinalized_items + (not self.got_done)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["wer"] = self.wer.wer
        row["wer_counts"] = asdict(self.wer)
        row["finalization_latencies"] = [round(x, 3) for x in self.finalization_latencies]
        return row


def score_session(number: int, client: int, plan: int, stream: Stream, record: StreamRecord, origin: float,
                  started: float) -> SessionOutcome:
    """Score one session as the stream bench scores a stream, plus what a soak counts as lost."""
    events = record.events()
    evaluation = evaluate_stream(number, events, stream.utterances)
    got_done = any(ev.get("type") == "transcript.text.done" for _, ev in events)
    started_items = {ev.get("item_id") for _, ev in events if ev.get("type") == "input_audio_buffer.speech_started"}
    segments = [ev for _, ev in events if ev.get("type") == "transcript.segment"]
    spans = [(float(ev.get("start") or 0.0), float(ev.get("end") or 0.0)) for ev in segments]
    lost = [(u, r) for u, r in zip(stream.utterances, evaluation.utterances) if r.lost]
    unfinalized = len(started_items - {ev.get("item_id") for ev in segments})
    problems = list(evaluation.problems)
    if unfinalized:
        problems.append(f"{unfinalized} utterance(s) announced by speech_started never got their transcript.segment")
    if record.error:
        problems.append(f"client: {record.error}")
    if record.close_code != 1000:
        problems.append(f"close code {record.close_code} (expected 1000)")
    return SessionOutcome(
        number=number,
        client=client,
        plan=plan,
        started_s=started - origin,
        ended_s=time.monotonic() - origin,
        audio_s=record.audio_s,
        utterances=len(stream.utterances),
        clips=[u.clip_id for u in stream.utterances],
        unfinalized_items=unfinalized,
        got_done=got_done,
        lost_clips=[r.clip_id for _, r in lost],
        lost_clips_unheard=sum(not any(lo < u.speech_end_s and hi > u.speech_start_s for lo, hi in spans) for u, _ in lost),
        wer=evaluation.wer,
        finalization_latencies=[u.finalization_latency_s for u in evaluation.utterances if u.finalization_latency_s is not None],
        close_code=record.close_code,
        error=record.error,
        problems=problems,
        frames_sent=record.frames_sent,
        frames_late=record.frames_late,
        send_lag_max_s=record.send_lag_max_s,
    )


def _dump_events(out: Path, outcome: SessionOutcome, record: StreamRecord) -> None:
    """Raw events of a failed session, so a lost final can be looked at after the run."""
    folder = out / "problem-sessions"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"session-{outcome.number:05d}.events.jsonl").open("w", encoding="utf-8") as fh:
        for t, raw in record.raw_events:
            fh.write(json.dumps({"t": round(t, 4), "raw": raw}) + "\n")


@dataclass
class SoakState:
    """Shared by the client loops and the sampler of one run."""

    origin: float
    deadline: float
    out: Path
    outcomes: list[SessionOutcome] = field(default_factory=list)
    numbers: Iterator[int] = field(default_factory=itertools.count)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    dumped: Counter[str] = field(default_factory=Counter)
    refusals: list[float] = field(default_factory=list)  # when (s since the start) a session was refused
    server_problem: str | None = None


async def client_loop(client: int, plans: list[Stream], cfg: ClientConfig, state: SoakState, start_delay_s: float) -> None:
    """One client: sessions back to back until the soak's deadline (the last one runs to its end)."""
    await asyncio.sleep(start_delay_s)
    log_path = state.out / "sessions.jsonl"
    backoff = 0
    number = next(state.numbers)
    while time.monotonic() < state.deadline and not state.stop.is_set():
        plan = number % len(plans)
        started = time.monotonic()
        record = await run_client(plans[plan], cfg)
        if is_refusal(record):  # retried with the same plan, so the thirds still hear the same audio
            state.refusals.append(started - state.origin)
            await asyncio.sleep(BACKOFF_S[min(backoff, len(BACKOFF_S) - 1)])
            backoff += 1
            continue
        outcome = score_session(number, client, plan, plans[plan], record, state.origin, started)
        number = next(state.numbers)
        state.outcomes.append(outcome)
        with log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(outcome.to_json()) + "\n")
        failed = outcome.lost_finals > 0 or outcome.error is not None
        kind = "failed" if failed else "missed" if outcome.lost_clips else None
        if kind is not None and state.dumped[kind] < MAX_PROBLEM_DUMPS[kind]:
            state.dumped[kind] += 1
            _dump_events(state.out, outcome, record)
        if outcome.error is not None:  # a broken connection: do not spin
            await asyncio.sleep(BACKOFF_S[min(backoff, len(BACKOFF_S) - 1)])
            backoff += 1
        else:
            backoff = 0


# ============================================================================================
# Resource sampling
# ============================================================================================


@dataclass
class SoakSample:
    """The server process at one moment (``t`` in seconds since the clients started)."""

    t: float
    rss_mb: float
    fds: int
    threads: int
    cpu_s: float
    active_sessions: float | None
    load1: float


def take_sample(monitor: ResourceMonitor, http_base: str | None, origin: float) -> SoakSample | None:
    """RSS and CPU of the process tree (the bench's own monitor), fds and threads of the server
    process, the active-sessions gauge; None once the process is gone."""
    base = monitor.sample()
    if base is None:
        return None
    try:
        fds = monitor.proc.num_fds()  # the entries of /proc/PID/fd
        threads = monitor.proc.num_threads()
    except psutil.Error:
        return None
    active = None
    text = server_metrics.fetch(http_base) if http_base else None
    if text is not None:
        active = server_metrics.parse(text).gauges.get("stream_active_sessions")
    return SoakSample(round(base.t - origin, 2), round(base.rss_bytes / 2**20, 2), fds, threads, round(base.cpu_s, 2), active,
                      os.getloadavg()[0])


async def sampler(pid: int, http_base: str | None, interval_s: float, state: SoakState, samples: list[SoakSample],
                  log: Any) -> None:
    """Sample every ``interval_s`` until the clients are done; stop the run if the server dies."""
    monitor = ResourceMonitor(pid)
    while True:
        sample = await asyncio.to_thread(take_sample, monitor, http_base, state.origin)
        if sample is None:
            state.server_problem = f"server process {pid} disappeared at t={time.monotonic() - state.origin:.0f} s"
            state.stop.set()
            return
        samples.append(sample)
        done = state.outcomes
        log(f"[soak] t={sample.t:6.0f} s  sessions {len(done)}  refused {len(state.refusals)}  lost finals {sum(o.lost_finals for o in done)}  "
            f"clips without text {sum(len(o.lost_clips) for o in done)}/{sum(o.utterances for o in done)}  "
            f"RSS {sample.rss_mb:.0f} MB  fds {sample.fds}  threads {sample.threads}  load {sample.load1:.1f}")
        try:
            await asyncio.wait_for(state.stop.wait(), timeout=interval_s)
            return
        except TimeoutError:
            continue


# ============================================================================================
# Figures
# ============================================================================================


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per hour; None for under 3 points."""
    slope = least_squares_slope(points, min_points=3)
    return None if slope is None else 3600.0 * slope


def window_figures(outcomes: Sequence[SessionOutcome]) -> dict[str, Any]:
    """Pooled figures of the sessions that ended in one time window."""
    wer = sum((o.wer for o in outcomes), ZERO_COUNTS)
    latencies = [x for o in outcomes for x in o.finalization_latencies]
    return {
        "sessions": len(outcomes),
        "utterances": sum(o.utterances for o in outcomes),
        "lost_finals": sum(o.lost_finals for o in outcomes),
        "clips_without_text": sum(len(o.lost_clips) for o in outcomes),
        "wer": round(wer.wer, 4) if wer.reference_words else None,
        "reference_words": wer.reference_words,
        "finalization_latency_s_p50": _round(percentile(latencies, 50)),
        "finalization_latency_s_p95": _round(percentile(latencies, 95)),
    }


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def windows(outcomes: Sequence[SessionOutcome], span_s: float, count: int) -> list[dict[str, Any]]:
    """``count`` equal windows over ``[0, span_s]`` by session end time (the last holds the tail)."""
    width = span_s / count
    rows = []
    for i in range(count):
        lo, hi = i * width, (i + 1) * width
        inside = [o for o in outcomes if lo <= o.ended_s < hi or (i == count - 1 and o.ended_s >= hi)]
        rows.append({"start_s": round(lo, 1), "end_s": round(hi, 1), **window_figures(inside)})
    return rows


def resource_figures(samples: Sequence[SoakSample], warmup_s: float) -> dict[str, Any]:
    """RSS slope after the warm-up and start/end/max of RSS, fds and threads."""
    if not samples:
        return {"samples": 0}
    after = [s for s in samples if s.t >= warmup_s] or list(samples)
    first, last = samples[0], samples[-1]
    span = last.t - first.t
    cpu = (last.cpu_s - first.cpu_s) / span if span > 0 else None
    return {
        "samples": len(samples),
        "samples_after_warmup": len(after),
        "active_sessions_at_end": last.active_sessions,
        "rss_slope_mb_per_h": _round(slope_per_hour([(s.t, s.rss_mb) for s in after]), 2),
        "rss_mb": {"start": first.rss_mb, "after_warmup": after[0].rss_mb, "end": last.rss_mb, "max": max(s.rss_mb for s in samples)},
        "fds": {"start": first.fds, "after_warmup": after[0].fds, "end": last.fds, "max": max(s.fds for s in samples)},
        "threads": {"start": first.threads, "after_warmup": after[0].threads, "end": last.threads,
                    "max": max(s.threads for s in samples)},
        "fds_slope_per_h": _round(slope_per_hour([(s.t, float(s.fds)) for s in after]), 2),
        "threads_slope_per_h": _round(slope_per_hour([(s.t, float(s.threads)) for s in after]), 2),
        "server_cpu_cores_mean": _round(cpu),
        "active_sessions_mean": _round(_mean([s.active_sessions for s in samples[:-1] if s.active_sessions is not None]), 2),
        "load_average_1m": {"min": min(s.load1 for s in samples), "mean": round(sum(s.load1 for s in samples) / len(samples), 2),
                            "max": max(s.load1 for s in samples)},
    }


def summarize_run(outcomes: Sequence[SessionOutcome], samples: Sequence[SoakSample], wall_s: float, warmup_s: float,
                  refusals: Sequence[float] = ()) -> dict[str, Any]:
    """The headline block of results.json: sessions, refusals, lost finals, drift, resources, errors."""
    third = wall_s / 3
    first = [o for o in outcomes if o.ended_s < third]
    last = [o for o in outcomes if o.ended_s >= 2 * third]
    f1, f3 = window_figures(first), window_figures(last)
    lost_by_clip = Counter(c for o in outcomes for c in o.lost_clips)
    played_by_clip = Counter(c for o in outcomes for c in o.clips)
    errors = Counter(_error_kind(p) for o in outcomes for p in o.problems)
    frames = sum(o.frames_sent for o in outcomes)
    return {
        "sessions": len(outcomes),
        "sessions_refused": len(refusals),
        "sessions_refused_first_third": sum(t < third for t in refusals),
        "sessions_refused_last_third": sum(t >= 2 * third for t in refusals),
        "sessions_with_done": sum(o.got_done for o in outcomes),
        "sessions_closed_1000": sum(o.close_code == 1000 for o in outcomes),
        "utterances": sum(o.utterances for o in outcomes),
        "audio_s": round(sum(o.audio_s for o in outcomes), 1),
        "lost_finals": sum(o.lost_finals for o in outcomes),
        "utterances_unfinalized": sum(o.unfinalized_items for o in outcomes),
        "sessions_without_done": sum(not o.got_done for o in outcomes),
        "clips_without_text": sum(len(o.lost_clips) for o in outcomes),
        "clips_without_text_unheard": sum(o.lost_clips_unheard for o in outcomes),
        "clips_without_text_by_clip": {c: {"lost": n, "played": played_by_clip.get(c, n)} for c, n in lost_by_clip.most_common()},
        "wer": window_figures(outcomes)["wer"],
        "wer_first_third": f1["wer"],
        "wer_last_third": f3["wer"],
        "wer_drift_points": None if f1["wer"] is None or f3["wer"] is None else round(100 * (f3["wer"] - f1["wer"]), 2),
        "first_third": f1,
        "last_third": f3,
        "windows": windows(outcomes, wall_s, max(1, min(10, int(wall_s // 60) or 3))),
        "errors": sum(bool(o.problems) for o in outcomes),
        "error_kinds": dict(errors.most_common()),
        "client_frames_late_50ms_fraction": round(sum(o.frames_late for o in outcomes) / frames, 4) if frames else None,
        "client_send_lag_max_s": round(max((o.send_lag_max_s for o in outcomes), default=0.0), 3),
        "resources": resource_figures(samples, warmup_s),
    }


def _error_kind(problem: str) -> str:
    """A problem line without its numbers, so counts group alike problems."""
    return re.sub(r"\d+", "N", problem)[:160]


# ============================================================================================
# Run and report
# ============================================================================================


async def run_soak(plans: list[Stream], client_cfg: ClientConfig, cfg: SoakConfig, pid: int | None, http_base: str | None,
                   out: Path, log: Any) -> tuple[SoakState, list[SoakSample], float]:
    """Run the clients and the sampler; returns the state (outcomes, refusals, server problem), the
    samples and the wall seconds."""
    origin = time.monotonic()
    state = SoakState(origin=origin, deadline=origin + cfg.duration_s, out=out)
    samples: list[SoakSample] = []
    sampling = asyncio.create_task(sampler(pid, http_base, cfg.sample_s, state, samples, log)) if pid is not None else None
    spread = min(cfg.session_s, 10.0)
    clients = [client_loop(c, plans, client_cfg, state, c * spread / cfg.clients) for c in range(cfg.clients)]
    await asyncio.gather(*clients)
    wall = time.monotonic() - origin
    state.stop.set()
    if sampling is not None and pid is not None:
        await sampling
        final = await final_sample(pid, http_base, origin)
        if final is not None:
            samples.append(final)
    return state, samples, wall


async def final_sample(pid: int, http_base: str | None, origin: float, settle_s: float = 5.0) -> SoakSample | None:
    """The sample after the last session: taken once the server's active-sessions gauge reads 0 (the
    last close may still be unwinding for a moment), or after ``settle_s`` if it never does, which the
    report then shows as sessions the server still holds."""
    monitor = ResourceMonitor(pid)
    give_up = time.monotonic() + settle_s
    while True:
        sample = await asyncio.to_thread(take_sample, monitor, http_base, origin)
        if sample is None or not sample.active_sessions or time.monotonic() >= give_up:
            return sample
        await asyncio.sleep(0.2)


def markdown(results: dict[str, Any]) -> str:
    """summary.md: the figures an operator checks after a soak."""
    s = results["summary"]
    r = s["resources"]
    cfg = results["config"]

    def fmt(v: Any, suffix: str = "") -> str:
        return "n/a" if v is None else f"{v}{suffix}"

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [
        "# Soak",
        "",
        f"{cfg['clients']} clients, sessions of ~{cfg['session_s']:.0f} s of real speech back to back at real time, "
        f"{results['wall_s']:.0f} s ({results['wall_s'] / 60:.1f} min); samples every {cfg['sample_s']:.0f} s, "
        f"warm-up {cfg['warmup_s']:.0f} s.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| sessions run (done received / closed 1000) | {s['sessions']} ({s['sessions_with_done']} / {s['sessions_closed_1000']}) |",
        f"| sessions refused with server_busy (first / last third) | {s['sessions_refused']} ({s['sessions_refused_first_third']} / "
        f"{s['sessions_refused_last_third']}) |",
        f"| utterances sent | {s['utterances']} |",
        f"| **lost finals** (utterances without their segment + sessions without done) | **{s['lost_finals']}** "
        f"({s['utterances_unfinalized']} + {s['sessions_without_done']}) |",
        f"| clips with no word in the final text (of which in no utterance) | {s['clips_without_text']} "
        f"({s['clips_without_text_unheard']}) |",
        f"| **RSS slope after warm-up** | **{fmt(r.get('rss_slope_mb_per_h'), ' MB/h')}** |",
    ]
    if r.get("samples"):
        lines += [
            f"| RSS start / after warm-up / end / max | {r['rss_mb']['start']:.0f} / {r['rss_mb']['after_warmup']:.0f} / "
            f"{r['rss_mb']['end']:.0f} / {r['rss_mb']['max']:.0f} MB |",
            f"| open fds start / end / max | {r['fds']['start']} / {r['fds']['end']} / {r['fds']['max']} |",
            f"| threads start / end / max | {r['threads']['start']} / {r['threads']['end']} / {r['threads']['max']} |",
            f"| sessions the server still holds after the last close | {fmt(r['active_sessions_at_end'])} |",
            f"| server CPU mean; open sessions mean | {fmt(r['server_cpu_cores_mean'], ' cores')}; {fmt(r['active_sessions_mean'])} |",
            f"| machine load (1 min) min / mean / max | {r['load_average_1m']['min']:.2f} / {r['load_average_1m']['mean']:.2f} / "
            f"{r['load_average_1m']['max']:.2f} |",
        ]
    f1, f3 = s["first_third"], s["last_third"]
    lines += [
        f"| WER all / first third / last third | {pct(s['wer'])} / {pct(s['wer_first_third'])} / {pct(s['wer_last_third'])} |",
        f"| WER drift (last − first third) | {fmt(s['wer_drift_points'], ' points')} |",
        f"| finalization p50/p95, first third | {fmt(f1['finalization_latency_s_p50'])} / {fmt(f1['finalization_latency_s_p95'])} s |",
        f"| finalization p50/p95, last third | {fmt(f3['finalization_latency_s_p50'])} / {fmt(f3['finalization_latency_s_p95'])} s |",
        f"| sessions with problems | {s['errors']} |",
        f"| client frames sent >50 ms late | {pct(s['client_frames_late_50ms_fraction'])} |",
        f"| server exit code on SIGTERM | {fmt(results['server'].get('exit_code'))} |",
        "",
        "## Windows (by session end)",
        "",
        "| window | sessions | utterances | lost finals | WER | final p50 / p95 |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for w in s["windows"]:
        lines.append(f"| {w['start_s']:.0f}–{w['end_s']:.0f} s | {w['sessions']} | {w['utterances']} | {w['lost_finals']} | "
                     f"{pct(w['wer'])} | {fmt(w['finalization_latency_s_p50'])} / {fmt(w['finalization_latency_s_p95'])} s |")
    if s["clips_without_text_by_clip"]:
        lines += ["", "## Clips without text, by clip", ""]
        lines += [f"- `{c}`: {v['lost']} of {v['played']} plays" for c, v in s["clips_without_text_by_clip"].items()]
    if s["error_kinds"]:
        lines += ["", "## Problems", ""]
        lines += [f"- {n}x {kind}" for kind, n in s["error_kinds"].items()]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _server_options(args: argparse.Namespace, out: Path) -> ServerOptions:
    extra = [a for chunk in args.server_arg for a in shlex.split(chunk)]
    if "--transcript-db" not in extra:  # hundreds of sessions: keep them out of the user's store
        extra += ["--transcript-db", str(out / "transcripts.sqlite3")]
    return ServerOptions(model=args.model, device=args.device, compute_type=args.compute_type, extra_args=extra)


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        duration_s=parse_duration(args.soak),
        clients=args.clients,
        corpus=args.corpus,
        session_s=args.soak_session_s,
        sample_s=args.soak_sample_s,
        warmup_s=args.soak_warmup_s,
        seed=args.seed,
        pause_range_s=(args.pause_min_s, args.pause_max_s),
        fill=args.pause_fill,
    )


def main_soak(args: argparse.Namespace, out: Path, stamp: _dt.datetime, argv: Sequence[str]) -> int:
    """The ``--soak`` mode of ``stream-server bench``: build plans, start a server, soak, report."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        _log(f"[soak] {exc}")
        return 2
    if cfg.clients < 1:
        _log("[soak] --clients must be at least 1")
        return 2
    if not (cfg.corpus / "manifest.jsonl").exists():
        _log(f"[soak] corpus not found: {cfg.corpus}/manifest.jsonl")
        return 2
    _log(f"[soak] preparing {PLANS} session plans of ~{cfg.session_s:.0f} s from {cfg.corpus} ...")
    plans = build_plans(cfg)
    language = None if args.language in ("auto", "null", "") else args.language
    client_cfg = ClientConfig(url=args.url or "", frame_ms=args.frame_ms, language=language, silence_duration_ms=args.silence_ms)
    notes = [f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU(s): the soak shares the machine"]
    options = _server_options(args, out)
    server: ServerProcess | None = None
    pid: int | None = args.server_pid
    http_base: str | None = None
    if args.url:
        http_base = args.url.replace("ws://", "http://").replace("wss://", "https://").split("/v1/")[0]
        if pid is None:
            notes.append("--url without --server-pid: no RSS, fd or thread samples")
    else:
        server = ServerProcess(options.args(), out / "server.log", startup_timeout_s=options.startup_timeout_s)
        server.start()
        client_cfg.url, http_base = server.ws_url, server.http_url
        pid = server.process.pid if server.process else None
    _log(f"[soak] {cfg.clients} client(s) for {cfg.duration_s:.0f} s against {client_cfg.url} ...")
    exit_code: int | None = None
    try:
        state, samples, wall = asyncio.run(run_soak(plans, client_cfg, cfg, pid, http_base, out, _log))
    finally:
        if server is not None:
            exit_code = server.stop()
    server_problem = state.server_problem
    if server_problem:
        notes.append(server_problem)
    tracebacks = server.log_path.read_text(errors="replace").count("Traceback") if server is not None else None
    results: dict[str, Any] = {
        "schema": 1,
        "tool": "stream_server.bench --soak",
        "created_utc": stamp.isoformat(timespec="seconds"),
        "notes": notes,
        "config": {
            "duration_s": cfg.duration_s, "clients": cfg.clients, "session_s": cfg.session_s, "sample_s": cfg.sample_s,
            "warmup_s": cfg.warmup, "plans": len(plans), "seed": cfg.seed, "corpus": str(cfg.corpus),
            "pause_range_s": list(cfg.pause_range_s), "pause_fill": cfg.fill, "frame_ms": args.frame_ms, "language": language,
            "model": args.model or "tiny.en (server default)", "server_args": options.extra_args, "url": args.url, "argv": list(argv),
        },
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_at_end": list(os.getloadavg())},
        "server": {"exit_code": exit_code, "log_tracebacks": tracebacks, "startup_s": server.startup_s if server else None},
        "wall_s": round(wall, 1),
        "summary": summarize_run(state.outcomes, samples, wall, cfg.warmup, state.refusals),
        "samples": [asdict(s) for s in samples],
        "sessions": [o.to_json() for o in state.outcomes],
        "refusals_s": [round(t, 1) for t in state.refusals],
    }
    write_json(out / "results.json", results)
    md = markdown(results)
    (out / "summary.md").write_text(md)
    _log(f"[soak] wrote {out}/results.json, summary.md, sessions.jsonl")
    print(md)
    failed = results["summary"]["lost_finals"] > 0 or server_problem is not None or exit_code not in (0, None, -15)
    return 1 if failed else 0
