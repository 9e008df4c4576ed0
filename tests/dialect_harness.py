"""A dialect in front of a real core session with the deterministic fake VAD and decoder, wired
as ``ws.py`` wires it: the dialect's commands go to the session, the session's events go back
through ``dialect.render``, decodes complete ``latency_chunks`` ticks after submission.

Each dialect's tests subclass :class:`DialectHarness` for their wire helpers."""

from __future__ import annotations

from typing import Any

from stream_server import protocol as p
from stream_server.dialects.base import Action, Close, Dialect, Send
from stream_server.session import DecodeTicket, Session, SessionLimits
from tests.fakes import BurstDecoder, EnergyVad

KNOWN_MODELS = ("tiny.en", "base")


class DialectHarness:
    def __init__(self, dialect: Dialect, session_id: str, latency_chunks: int = 5, known_models: tuple[str, ...] = KNOWN_MODELS) -> None:
        self.dialect = dialect
        config = p.SessionConfig.model_validate({"model": "tiny.en"}).updated(dialect.initial_config())
        self.session = Session(
            session_id,
            config=config,
            vad=EnergyVad(),
            limits=SessionLimits(max_utterance_s=6.0),
            model_exists=lambda name: name in known_models,
        )
        self.decoder = BurstDecoder()
        self.latency = latency_chunks
        self.clock = 0
        self.inflight: list[tuple[int, DecodeTicket]] = []
        self.sent: list[str | bytes] = []  # what went to the client
        self.closes: list[Close] = []
        self.commands: list[p.ClientMessage] = []  # what the dialect asked of the core
        self.events: list[p.ServerEvent] = []  # what the core produced
        self.session.start()
        self.pump()

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append(action.message)
                self.on_send(action.message)
            elif isinstance(action, Close):
                self.closes.append(action)
            else:
                self.commands.append(action)
                self.session.receive_message(action)
                self.pump()

    def on_send(self, message: str | bytes) -> None:
        """A message went to the client (subclasses track protocol state here)."""

    def pump(self) -> None:
        for ticket in self.session.decodes_to_submit():
            self.inflight.append((self.clock + self.latency, ticket))
        self.session.decodes_to_promote()
        for event in self.session.events_to_send():
            self.events.append(event)
            self.apply(self.dialect.render(event))
        close = self.session.close_expected()
        if close is not None and not self.closes:
            self.closes.append(Close(close.code, close.reason))

    def tick(self) -> None:
        self.clock += 1
        due = [item for item in self.inflight if item[0] <= self.clock]
        self.inflight = [item for item in self.inflight if item[0] > self.clock]
        for _, ticket in due:
            [result] = self.decoder.decode_batch([ticket.request])
            self.session.receive_decode_result(ticket, result)
            self.pump()

    def settle(self) -> None:
        while self.inflight:
            self.tick()

    def receive_text(self, text: str) -> None:
        self.apply(self.dialect.receive_text(text))

    def receive_bytes(self, data: bytes) -> None:
        self.apply(self.dialect.receive_bytes(data))

    def core_events(self, kind: type[p.ServerEvent]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]
