"""Deterministic replay of spoken numbers: how well digit strings are read, and how well redacted.

A contact center's callers read out card numbers, phone numbers and social security numbers, and
its transcripts must get them right (an account looked up by a misread digit is the wrong one)
or, with redaction, not show them at all. Neither the corpus replay nor the calls hold a digit
string longer than a few words, so neither measures this.

Here each number is read digit by digit by the corpus's own voices (FSDD: a clip per digit,
speakers drawn per digit, short gaps inside a group and longer ones between groups), between two
read sentences of other speakers; each runs through a real :class:`~stream_server.session.Session`
with the replay loop of :mod:`.replay` (decode results ``lag_ms`` of audio late), twice: plainly,
scored as the digit error rate (digits written as numerals or words) and the WER of the
sentences around it; and with ``redact: ["pci", "ssn"]``, scored as the digits each kind of
number still shows and how many numbers show none.

Usage::

    stream-server bench --replay --numbers 24 [--replay-jitter-ms 50 --replay-repeats 3] [--limit NAME=VALUE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jiwer
import numpy as np

from stream_server.audio_files import read_wav
from stream_server.redaction import without_placeholders
from stream_server.session import Session
from stream_server.words import SPOKEN_DIGITS, bare_word, digits_in

from .corpus import Stream
from .metrics import pooled_wer
from .replay import ReplayDecoders, ReplayOptions, StreamReplay, replay_args_problem, replay_options, replay_stream, run_decoded

RATE = 16000
#: The kinds of number read, as a contact center hears them: digits, and the groups they are
#: read in (a longer pause between groups).
KINDS: dict[str, tuple[int, ...]] = {"card": (4, 4, 4, 4), "phone": (3, 3, 4), "ssn": (3, 2, 4)}
GAP_S = (0.03, 0.12)  # between the digits of a group
GROUP_GAP_S = (0.25, 0.6)  # between groups
QUIET_S = 0.5  # before the first sentence and after the last
PAUSE_S = 0.3  # between a sentence and the number
REDACT = ["pci", "ssn"]


@dataclasses.dataclass(frozen=True)
class SpokenNumber:
    """One number between two sentences, and what was said."""

    kind: str
    digits: str
    grouped: str  # as read: groups separated by spaces
    sentences: str  # the two sentences' references, in order
    audio: np.ndarray  # 16 kHz float32


def digit_voices(manifest: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Each digit's FSDD clips in the corpus (``fsdd_<digit>_<speaker>_<take>``)."""
    voices: dict[str, list[str]] = {}
    for row in manifest:
        match = re.fullmatch(r"fsdd_(\d)_.+", row["id"])
        if match:
            voices.setdefault(match.group(1), []).append(row["path"])
    return voices


def read_out(grouped: str, clip: Callable[[str], np.ndarray], gap_s: Callable[[], float], group_gap_s: Callable[[], float]) -> np.ndarray:
    """``grouped`` ("5204 7300") read digit by digit: ``clip(digit)`` each followed by
    ``gap_s()`` of silence, a space ``group_gap_s()`` (called in reading order, so seeded
    draws repeat)."""
    parts: list[np.ndarray] = []
    for ch in grouped:
        if ch == " ":
            parts.append(np.zeros(int(RATE * group_gap_s()), np.float32))
        else:
            parts += [clip(ch), np.zeros(int(RATE * gap_s()), np.float32)]
    return np.concatenate(parts)


def spoken_digits(grouped: str, corpus: Path, rng: random.Random, voices: dict[str, list[str]]) -> np.ndarray:
    """``grouped`` read by voices drawn from the corpus's, gaps drawn too."""
    return read_out(grouped, lambda ch: read_wav(corpus / rng.choice(voices[ch]))[0],
                    lambda: rng.uniform(*GAP_S), lambda: rng.uniform(*GROUP_GAP_S))


def sentences(manifest: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Short English read sentences with no number in their reference (so every digit heard is the number's)."""
    return [
        row for row in manifest
        if row.get("language") == "en" and row.get("kind") == "read" and row.get("text") and 1.4 <= row["duration_s"] <= 3.5
        and not any(digits_in(bare_word(w)) for w in row["text"].split()) and not row["id"].startswith("fsdd_")
    ]


def build_numbers(count: int, corpus: Path, seed: int = 0) -> list[SpokenNumber]:
    """``count`` numbers, the kinds in turn, each between two different sentences."""
    manifest = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines() if line.strip()]
    voices, said = digit_voices(manifest), sentences(manifest)
    if sorted(voices) != list("0123456789") or len(said) < 2:
        raise ValueError(f"{corpus} lacks FSDD digit clips or short read sentences")
    rng = random.Random(seed)
    numbers: list[SpokenNumber] = []
    for i in range(count):
        kind = list(KINDS)[i % len(KINDS)]
        groups = ["".join(rng.choice("0123456789") for _ in range(n)) for n in KINDS[kind]]
        before, after = rng.sample(said, 2)
        quiet, pause = np.zeros(int(RATE * QUIET_S), np.float32), np.zeros(int(RATE * PAUSE_S), np.float32)
        audio = np.concatenate([
            quiet, read_wav(corpus / before["path"])[0], pause,
            spoken_digits(" ".join(groups), corpus, rng, voices), pause, read_wav(corpus / after["path"])[0], quiet,
        ])
        numbers.append(SpokenNumber(kind, "".join(groups), " ".join(groups), f"{before['text']} {after['text']}", audio))
    return numbers


def digits_of(text: str) -> str:
    """The digits ``text`` says, as numerals or words ("5, two" → "52"); placeholders say none."""
    tokens = re.findall(r"[a-z']+|\d", without_placeholders(text).lower())
    return "".join(SPOKEN_DIGITS.get(t, t) for t in tokens if t.isdigit() or t in SPOKEN_DIGITS)


def words_of(text: str) -> str:
    """``text`` without its numbers and placeholders: the sentences around the number."""
    tokens = re.findall(r"[a-z']+", without_placeholders(text).lower())
    return " ".join(t for t in tokens if t not in SPOKEN_DIGITS)


def done_text(replayed: StreamReplay) -> str:
    return next((str(e.get("text", "")) for _, e in replayed.events if e.get("type") == "transcript.text.done"), "")


def run_numbers(options: ReplayOptions, numbers: list[SpokenNumber], redact: Sequence[str]) -> tuple[dict[str, Any], list[list[str]]]:
    """Replay every number (``options.repeats`` times) with ``redact``; the work figures and
    each run's final texts, in number order."""
    texts: list[list[str]] = [[] for _ in range(options.repeats)]

    def one(decoders: ReplayDecoders, index: int, repeat: int) -> StreamReplay:
        number = numbers[index]
        pcm = (np.clip(number.audio, -1, 1) * 32767).astype(np.int16)
        config = options.session_config(language="en", interim_results=True, redact=list(redact))
        session = Session(f"replay_number_{index}", config=config, vad=decoders.vad, limits=options.limits)
        replayed = replay_stream(Stream(index, RATE, pcm, []), session, decoders.whisper, options.lag(repeat, index))
        texts[repeat].append(done_text(replayed))
        return replayed

    return run_decoded(options, len(numbers), one), texts


def digit_error(pairs: Sequence[tuple[str, str]]) -> float:
    """Edits over reference digits, digit by digit (no text normaliser: Whisper's would read
    "5 2 0 4" as one number)."""
    edits = total = 0
    for said, read in pairs:
        total += len(said)
        if not read:
            edits += len(said)
            continue
        out = jiwer.process_words(" ".join(said), " ".join(read))
        edits += out.substitutions + out.deletions + out.insertions
    return edits / total if total else 0.0


def plain_figures(numbers: list[SpokenNumber], runs: list[list[str]]) -> dict[str, Any]:
    """Digit error rate (edit distance over digits) by kind and in all, and the sentences' WER."""
    out: dict[str, Any] = {}
    for kind in [*KINDS, "all"]:
        pairs = [(n.digits, digits_of(t)) for run in runs for n, t in zip(numbers, run, strict=True) if kind in (n.kind, "all")]
        out[f"digit_error_{kind}"] = digit_error(pairs)
    exact = [digits_of(t) == n.digits for run in runs for n, t in zip(numbers, run, strict=True)]
    out["numbers_exact"] = sum(exact) / len(exact)
    out["sentence_wer"] = pooled_wer((n.sentences, words_of(t)) for run in runs for n, t in zip(numbers, run, strict=True)).wer
    return out


def redacted_figures(numbers: list[SpokenNumber], runs: list[list[str]]) -> dict[str, Any]:
    """Per kind: the digits still shown, as a share of the number's digits and as the most any
    number showed, and the share of numbers that showed none; the sentences' WER."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        shown = [len(digits_of(t)) for run in runs for n, t in zip(numbers, run, strict=True) if n.kind == kind]
        total = sum(len(n.digits) for n in numbers if n.kind == kind) * len(runs)
        out[f"shown_share_{kind}"] = sum(shown) / total if total else 0.0
        out[f"shown_max_{kind}"] = max(shown, default=0)
        out[f"hidden_whole_{kind}"] = sum(s == 0 for s in shown) / len(shown) if shown else 0.0
    out["sentence_wer"] = pooled_wer((n.sentences, words_of(t)) for run in runs for n, t in zip(numbers, run, strict=True)).wer
    return out


def markdown(result: dict[str, Any]) -> str:
    plain, red = result["plain"], result["redacted"]
    rows = [("numbers", f"{result['options']['numbers']} ({', '.join(KINDS)} in turn), {result['options']['repeats']} run(s)")]
    rows += [(f"digit error, {kind}", f"{plain[f'digit_error_{kind}'] * 100:.1f}%") for kind in [*KINDS, "all"]]
    rows += [("numbers read exactly", f"{plain['numbers_exact'] * 100:.0f}%"), ("sentences' WER", f"{plain['sentence_wer'] * 100:.1f}%")]
    rows += [(f"redact {'+'.join(REDACT)}: {kind} digits shown (most in one)", f"{red[f'shown_share_{kind}'] * 100:.1f}% ({red[f'shown_max_{kind}']}); "
              f"none shown in {red[f'hidden_whole_{kind}'] * 100:.0f}%") for kind in KINDS]
    rows += [("redacted: sentences' WER", f"{red['sentence_wer'] * 100:.1f}%")]
    if result["options"]["repeats"] > 1:
        rows += [("digit error by run", " / ".join(f"{e * 100:.1f}%" for e in result["digit_error_by_run"]))]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]) + "\n"


def main_number_replay(args: argparse.Namespace, out: Path) -> int:
    """``stream-server bench --replay --numbers N``: writes ``numbers.json``, ``numbers.md``, ``numbers.txt``."""
    problem = replay_args_problem(args)
    if problem:
        print(f"[bench] {problem}", file=sys.stderr)
        return 2
    numbers = build_numbers(args.numbers, args.corpus, seed=args.seed)
    options = replay_options(args)
    plain_work, plain = run_numbers(options, numbers, [])
    redacted_work, redacted = run_numbers(options, numbers, REDACT)
    result = {
        "options": {**plain_work["options"], "numbers": len(numbers)},
        "plain": plain_figures(numbers, plain),
        "digit_error_by_run": [plain_figures(numbers, [run])["digit_error_all"] for run in plain],
        "redacted": redacted_figures(numbers, redacted),
        "work": {"plain": plain_work["work"], "redacted": redacted_work["work"]},
    }
    (out / "numbers.json").write_text(json.dumps(result, indent=2))
    lines = [f"{n.kind} {n.grouped} | {n.sentences}\n  read:     {a}\n  redacted: {b}" for n, a, b in zip(numbers, plain[0], redacted[0], strict=True)]
    (out / "numbers.txt").write_text("\n".join(lines) + "\n")
    md = markdown(result)
    (out / "numbers.md").write_text(md)
    print(md)
    print(f"[bench] each number as read and redacted (first run): {out / 'numbers.txt'}", file=sys.stderr)
    return 0


__all__ = ["KINDS", "SpokenNumber", "build_numbers", "digits_of", "main_number_replay", "run_numbers", "spoken_digits"]
