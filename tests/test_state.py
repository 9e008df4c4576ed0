"""The one transition table: every machine only goes forward, and an illegal move is a typed error."""

from __future__ import annotations

from typing import Any

import pytest

from stream_server.state import (
    TRANSITIONS,
    IllegalTransition,
    SessionState,
    TicketState,
    UtteranceState,
    transition,
)


def test_every_state_of_every_machine_has_a_row() -> None:
    for machine in (SessionState, UtteranceState, TicketState):
        for state in machine:
            assert state in TRANSITIONS
            assert all(type(target) is machine for target in TRANSITIONS[state])


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (SessionState.OPEN, SessionState.CLOSING),
        (SessionState.CLOSING, SessionState.CLOSED),
        (UtteranceState.OPEN, UtteranceState.ENDED),
        (UtteranceState.ENDED, UtteranceState.FINAL),
        (TicketState.INTERIM, TicketState.FINAL),
        (TicketState.FINAL, TicketState.RESOLVED),
    ],
)
def test_allowed_moves_return_the_target(current: Any, target: Any) -> None:
    assert transition(current, target) is target


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (SessionState.OPEN, SessionState.CLOSED),  # done is only sent after the flush
        (SessionState.CLOSED, SessionState.OPEN),
        (SessionState.CLOSING, SessionState.CLOSING),  # a second close is not a transition
        (UtteranceState.OPEN, UtteranceState.FINAL),  # every utterance ends before it is final
        (UtteranceState.FINAL, UtteranceState.ENDED),
        (TicketState.INTERIM, TicketState.RESOLVED),  # interim results are applied, never resolved
        (TicketState.RESOLVED, TicketState.RESOLVED),  # a result is applied once
    ],
)
def test_illegal_moves_raise_a_typed_error(current: Any, target: Any) -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(current, target)
    assert info.value.current is current and info.value.target is target
    assert current.name in str(info.value) and target.name in str(info.value)


def test_terminal_states_have_no_way_out() -> None:
    assert TRANSITIONS[SessionState.CLOSED] == frozenset()
    assert TRANSITIONS[UtteranceState.FINAL] == frozenset()
    assert TRANSITIONS[TicketState.RESOLVED] == frozenset()
