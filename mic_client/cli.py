"""``mic-client`` command line: live captions from a microphone or an audio file.

Exit codes (stable, for scripts and CI):

* 0 -- the session ended normally: ``transcript.text.done`` arrived (after Ctrl-C or end of file);
* 1 -- something failed after connecting (audio device error, the server closed the session early,
  no answer to ``session.close``);
* 2 -- no session could be opened (connection refused, bad URL, handshake rejected, server busy)
  or the command line was wrong;
* 130 -- interrupted twice (the second Ctrl-C quits without waiting for the final transcript).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from mic_client import __version__
from mic_client.audio_source import (
    CHANNEL_MODES,
    MAX_CHANNELS,
    AudioSource,
    AudioSourceError,
    ChannelMode,
    FileSource,
    MicSource,
    list_devices,
    parse_device,
)
from mic_client.captions import CaptionRenderer
from mic_client.client import (
    DEFAULT_CLOSE_TIMEOUT_S,
    DEFAULT_URL,
    ConnectError,
    SessionResult,
    StreamClient,
    describe_error,
)
from mic_client.writers import FORMATS, EventWriter, infer_format, open_writer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONNECT = 2
EXIT_ABORTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mic-client",
        description=(
            "Stream the default microphone (or an audio file) to stream-server and show live "
            "captions: the unfinished utterance updates in place, final text becomes lines. "
            "Ctrl-C (or the end of the file) finalizes the transcript and exits; a second Ctrl-C "
            "quits at once. When stdout is not a terminal only final lines are printed."
        ),
        epilog=(
            "exit codes: 0 transcript complete, 1 failure during the session, "
            "2 could not connect / bad arguments (the server's too: an unknown --model, a --language "
            "the model does not transcribe), 130 interrupted twice"
        ),
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("MIC_CLIENT_URL", DEFAULT_URL),
        help=f"server WebSocket endpoint (env MIC_CLIENT_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--file",
        metavar="PATH",
        help="stream this audio file (wav, flac, mp3, anything FFmpeg decodes) instead of the "
        "microphone; it is resampled to 16 kHz and sent at real-time pace. A file with several "
        "channels (a call recording with one leg per channel, up to 8) is streamed as that many "
        "channels and the captions say who spoke; see --multichannel",
    )
    parser.add_argument(
        "--multichannel",
        choices=CHANNEL_MODES,
        default=None,
        help="with --file, for a file with several channels: split = one speaker per channel, "
        "mix = mix down to mono, auto (default) = split unless the channels carry the same audio "
        "(a mono voice saved as stereo), which is streamed as mono",
    )
    parser.add_argument(
        "--channel-labels",
        type=_labels,
        metavar="A,B,...",
        help="with --file: names of the file's channels, in order (e.g. agent,customer); the server "
        "echoes them as 'speaker' and captions show them (default: ch0, ch1, ...). Implies "
        "--multichannel split",
    )
    parser.add_argument(
        "--speed",
        type=_non_negative_float,
        default=None,
        metavar="X",
        help="with --file: pace multiplier (1 = real time, the default; 2 = twice as fast; "
        "0 = as fast as the connection allows)",
    )
    parser.add_argument(
        "--language",
        help="language code (en, de, ...) or locale (en-US); default: the server decides "
        "(detection with multilingual models, English with .en models)",
    )
    parser.add_argument("--model", help="ask the server for this model (e.g. tiny.en, base)")
    parser.add_argument(
        "--translate",
        action="store_true",
        help="English captions of speech in any language (Whisper's translation; needs a "
        "multilingual model on the server, e.g. --model base)",
    )
    parser.add_argument(
        "--prompt",
        help='names and vocabulary the speech uses ("Sweynheim, Pannartz, Subiaco."): the decoder '
        "gets them with every decode of 1.5 s of audio or more (at most 1000 characters)",
    )
    parser.add_argument(
        "--device",
        help="input device: index or part of its name from --list-devices (default: the "
        "system's default input)",
    )
    parser.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="also write the session to PATH: jsonl = every received event plus its wall-clock "
        "'received_at' (Unix seconds); srt = one subtitle cue per final segment",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="format of --output (default: from its extension, .jsonl or .srt)",
    )
    parser.add_argument(
        "--frame-ms",
        type=int,
        default=50,
        metavar="MS",
        help="audio per WebSocket frame in milliseconds (default 50; 10-1000)",
    )
    parser.add_argument(
        "--close-timeout",
        type=float,
        default=DEFAULT_CLOSE_TIMEOUT_S,
        metavar="S",
        help="after the end of input, give up when the server has sent nothing for S seconds "
        f"(default {DEFAULT_CLOSE_TIMEOUT_S:g})",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no status lines on stderr (errors still)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if len(labels) > MAX_CHANNELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_CHANNELS} labels (one per channel)")
    if any(not 1 <= len(label) <= 64 for label in labels):
        raise argparse.ArgumentTypeError("each label must be 1-64 characters, separated by commas")
    return labels


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.speed is not None and not args.file:
        parser.error("--speed only applies to --file")
    for flag, value in (("--multichannel", args.multichannel), ("--channel-labels", args.channel_labels)):
        if value is not None and not args.file:
            parser.error(f"{flag} only applies to --file (the microphone is one channel)")
    if args.channel_labels is not None and args.multichannel == "mix":
        parser.error("--channel-labels names channels, but --multichannel mix mixes them into one")
    if args.device is not None and args.file:
        parser.error("--device only applies to the microphone, not to --file")
    if args.format is not None and not args.output:
        parser.error("--format needs --output")
    if args.output:
        try:
            args.format = infer_format(args.output, args.format)
        except ValueError as exc:
            parser.error(str(exc))
    if not 10 <= args.frame_ms <= 1000:
        parser.error("--frame-ms must be between 10 and 1000")
    if args.close_timeout <= 0:
        parser.error("--close-timeout must be > 0")


class Display:
    """Routes events to the terminal (through the caption renderer) and to the --output writer."""

    def __init__(
        self,
        renderer: CaptionRenderer,
        out: TextIO,
        err: TextIO,
        writer: EventWriter | None,
    ) -> None:
        self.renderer = renderer
        self.out = out
        self.err = err
        self.writer = writer

    def on_event(self, event: dict[str, Any], received_at: float) -> None:
        if self.writer is not None:
            self.writer.write(event, received_at)
        self._show(self.renderer.feed(event))

    def on_error(self, event: dict[str, Any]) -> None:
        self.message(describe_error(event))

    def message(self, text: str) -> None:
        """A line on stderr that does not tear through the live caption line."""
        self._show(self.renderer.interrupt())
        self.err.write(f"mic-client: {text}\n")
        self.err.flush()
        self._show(self.renderer.restore())

    def finish(self) -> None:
        self._show(self.renderer.finish())

    def _show(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def _wants_color() -> bool:
    # https://no-color.org and dumb terminals: no escape sequences beyond \r and erase-line.
    return "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclasses.dataclass
class Interrupts:
    """Ctrl-C presses (and SIGTERMs) seen so far, counted by one process-wide handler that stays
    installed from before the event loop starts until the process exits.

    Why not ``loop.add_signal_handler``: closing the loop puts Python's default SIGINT handler
    back, so a second press that lands while the loop shuts down (a short utterance can finalize
    within the 50 ms between two presses) raised ``KeyboardInterrupt`` outside every handler and
    the process died by the signal (status -2) instead of exiting 130. With this handler a press is
    always counted, and while a loop is attached it is also handed to that loop's callback.
    """

    presses: int = 0
    _loop: asyncio.AbstractEventLoop | None = dataclasses.field(default=None, repr=False)
    _on_press: Callable[[int], None] | None = dataclasses.field(default=None, repr=False)

    def handle(self, signum: int, frame: object) -> None:
        """The ``signal.signal`` handler (main thread, between two bytecodes)."""
        self.presses += 1
        loop, on_press = self._loop, self._on_press
        if loop is not None and on_press is not None and not loop.is_closed():
            presses = self.presses
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(on_press, presses)

    def attach(self, loop: asyncio.AbstractEventLoop, on_press: Callable[[int], None]) -> None:
        """Hand the next presses to ``on_press(presses)`` on ``loop``."""
        self._loop, self._on_press = loop, on_press

    def detach(self) -> None:
        self._loop = self._on_press = None

    @contextlib.contextmanager
    def installed(self, *, exiting: bool = False) -> Iterator[None]:
        """Count SIGINT and SIGTERM for the duration.

        Afterwards the previous handlers come back, for in-process callers; when the process is
        ``exiting``, the signals are ignored instead. Python's finalization puts the default
        disposition back on any signal that has a Python handler, so a second press landing in the
        last milliseconds (after the exit code is decided) would end the process by the signal.
        """
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self.handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if exiting else handler)


async def _run(args: argparse.Namespace, out: TextIO, err: TextIO, interrupts: Interrupts | None = None) -> int:
    source: AudioSource
    if args.file:
        speed = 1.0 if args.speed is None else args.speed
        mode: ChannelMode = args.multichannel or ("split" if args.channel_labels else "auto")
        source = FileSource(args.file, speed=speed, frame_ms=args.frame_ms, channel_mode=mode)
    else:
        source = MicSource(parse_device(args.device), frame_ms=args.frame_ms)

    live = _is_tty(out)
    renderer = CaptionRenderer(
        live=live,
        columns=(lambda: shutil.get_terminal_size().columns) if live else None,
        color=live and _wants_color(),
    )
    writer: EventWriter | None = None
    display = Display(renderer, out, err, None)

    def status(text: str) -> None:
        if not args.quiet:
            display.message(text)

    try:
        try:
            await source.start()
        except AudioSourceError as exc:
            display.message(str(exc))
            return EXIT_FAILED
        labels: list[str] | None = args.channel_labels
        if labels is not None and len(labels) != source.channels:
            display.message(
                f"--channel-labels names {len(labels)} channel(s) but {args.file} has {source.channels}"
            )
            return EXIT_CONNECT  # a wrong command line (exit code 2), found once the file is open
        renderer.channels, renderer.labels = source.channels, labels
        if args.output:
            try:
                writer = open_writer(args.output, args.format, channels=source.channels, labels=labels)
            except OSError as exc:
                display.message(f"cannot write --output {args.output!r}: {exc.strerror or exc}")
                return EXIT_FAILED
            display.writer = writer

        if isinstance(source, MicSource):
            what = f"microphone {source.device_name!r} ({source.sample_rate} Hz)"
            announce = f"streaming {what} to {args.url}; Ctrl-C to finish"
        else:
            announce = f"streaming {args.file}{_describe_channels(source, labels)} to {args.url}"

        client = StreamClient(
            args.url,
            source,
            language=args.language,
            model=args.model,
            channel_labels=labels,
            prompt=args.prompt,
            translate=args.translate,
            on_event=display.on_event,
            on_error=display.on_error,
            on_open=lambda: status(announce),
            close_timeout=args.close_timeout,
        )
        _install_signal_handlers(client, display, interrupts or Interrupts())

        try:
            result = await client.run()
        except ConnectError as exc:
            display.message(str(exc))
            return EXIT_CONNECT
        except AudioSourceError as exc:
            display.message(str(exc))
            return EXIT_FAILED
        finally:
            display.finish()
        if isinstance(source, MicSource) and source.overflows:
            status(f"warning: the input overflowed {source.overflows} time(s); audio was lost")
        return _exit_code(result, display, args)
    except asyncio.CancelledError:
        display.finish()
        display.message("interrupted; the last words may not have been transcribed")
        return EXIT_ABORTED
    finally:
        await source.aclose()
        if writer is not None:
            writer.close()


def _describe_channels(source: AudioSource, labels: list[str] | None) -> str:
    """What the status line says about a file's channels ("" for a plain mono file)."""
    if isinstance(source, FileSource) and source.mixed_same_signal:
        return f" ({source.file_channels} channels carrying the same audio, streamed as mono)"
    if isinstance(source, FileSource) and source.file_channels > 1 and source.channels == 1:
        return f" ({source.file_channels} channels mixed down to mono)"
    if source.channels > 1:
        names = ", ".join(labels or [f"ch{c}" for c in range(source.channels)])
        return f" ({source.channels} channels: {names})"
    return ""


def _install_signal_handlers(client: StreamClient, display: Display, interrupts: Interrupts) -> None:
    """First Ctrl-C (or SIGTERM): finish gracefully. Second: cancel everything and quit."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_press(presses: int) -> None:
        if presses == 1:
            display.message("finishing the transcript... (Ctrl-C again to quit now)")
            client.request_stop()
        elif main_task is not None:
            main_task.cancel()

    interrupts.attach(loop, on_press)


def _exit_code(result: SessionResult, display: Display, args: argparse.Namespace) -> int:
    if result.refused is not None:
        display.message("the server refused these settings (above), so nothing was streamed")
        return EXIT_CONNECT  # a wrong command line for this server
    if result.complete:
        return EXIT_OK
    code = result.close_code
    reason = f" ({result.close_reason})" if result.close_reason else ""
    if result.timed_out:
        display.message(
            f"no answer from the server for {args.close_timeout:g} s after session.close; "
            "the transcript may be incomplete"
        )
    elif code in (None, 1006):
        display.message(
            "the connection to the server was lost before transcript.text.done; "
            "the transcript may be incomplete"
        )
    else:
        display.message(
            f"the server closed the session (code {code}{reason}) before transcript.text.done; "
            "the transcript may be incomplete"
        )
    return EXIT_FAILED


def entry() -> None:
    """Console-script entry point: :func:`main`, then exit with its code."""
    raise SystemExit(main(exiting=True))


def main(argv: Sequence[str] | None = None, *, exiting: bool = False) -> int:
    """Run the command line and return its exit code (``exiting``: see :meth:`Interrupts.installed`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.list_devices:
        try:
            print(list_devices())
        except AudioSourceError as exc:
            print(f"mic-client: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    interrupts = Interrupts()
    with interrupts.installed(exiting=exiting):
        try:
            code = asyncio.run(_run(args, sys.stdout, sys.stderr, interrupts))
        except (KeyboardInterrupt, asyncio.CancelledError):
            # A second press that cancelled the run while it was closing its audio source (outside
            # _run's handler), or an interrupt raised by code that installed its own handler.
            code, interrupts.presses = EXIT_FAILED, max(2, interrupts.presses + 1)
        finally:
            interrupts.detach()
        if interrupts.presses >= 2 and code != EXIT_ABORTED:  # (when _run was cancelled it said so)
            print("mic-client: interrupted; the last words may not have been transcribed", file=sys.stderr)
            return EXIT_ABORTED
        return code


if __name__ == "__main__":
    entry()
