"""The session core's states and, in one table, every transition between them.

As in h11's ``_state.py``: to know what can happen next, read :data:`TRANSITIONS`. The session
and its utterances and decode tickets never flip a flag; they call :func:`transition`, which
refuses a move the table does not list with a typed :class:`IllegalTransition`, so a logic error
surfaces where it happens instead of as a lost or duplicated segment later.

Three small machines:

* **Session** — ``OPEN`` takes audio and commands; the client's close (or end of input) makes it
  ``CLOSING``: no input is accepted, open utterances are finalized; once the last final is back it
  is ``CLOSED`` (``transcript.text.done`` and the close request have gone out).
* **Utterance** — ``OPEN`` while its speech goes on (interim decodes, agreement commits);
  ``ENDED`` once the turn ended (VAD, commit, clear, split or close): its audio is fixed and its
  last words come from a final decode or its last hypothesis; ``FINAL`` once that text is
  committed and its segment is out.
* **Decode ticket** — ``INTERIM`` work may be promoted to ``FINAL`` when it already heard the
  turn's end; a ``FINAL`` ticket becomes ``RESOLVED`` when its result (or its failure, or the
  decision to need no decode) is in. Finals are applied strictly in audio order, so a resolved
  ticket may wait for an earlier one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class UtteranceState(enum.Enum):
    OPEN = "open"
    ENDED = "ended"  # finalizing: the audio is fixed, the last words are on their way
    FINAL = "final"


class TicketState(enum.Enum):
    INTERIM = "interim"
    FINAL = "final"  # awaiting its result
    RESOLVED = "resolved"  # result in; applied once every earlier final is


State = SessionState | UtteranceState | TicketState
S = TypeVar("S", SessionState, UtteranceState, TicketState)

# Rule 1: the only moves there are. Every machine only goes forward; terminal states have none.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    SessionState.OPEN: frozenset({SessionState.CLOSING}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
    UtteranceState.OPEN: frozenset({UtteranceState.ENDED}),
    UtteranceState.ENDED: frozenset({UtteranceState.FINAL}),
    UtteranceState.FINAL: frozenset(),
    TicketState.INTERIM: frozenset({TicketState.FINAL}),  # promotion
    TicketState.FINAL: frozenset({TicketState.RESOLVED}),
    TicketState.RESOLVED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in the session core, never a client's fault."""

    def __init__(self, current: State, target: State) -> None:
        super().__init__(f"{type(current).__name__}: {current.name} -> {target.name} is not allowed")
        self.current = current
        self.target = target


def transition(current: S, target: S) -> S:
    """``target`` if the table allows ``current`` → ``target``; raises :class:`IllegalTransition`."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)
    return target
