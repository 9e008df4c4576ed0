"""Test-wide settings for the servers the tests start.

Admission control (``--admission-max-turn-end-s``) refuses new sessions while the decodes that
end turns run late, or new turns wait for their first text (``--admission-max-first-text-s``, off
with it). That is a capacity decision, measured by ``stream-server bench``; on a CI
machine shared with other jobs it would turn machine noise into refused sessions in functional
tests. Every server a test starts inherits this environment, so it is off unless a test turns it
on (tests/test_readiness.py does, in-process).
"""

import os

os.environ.setdefault("STREAM_SERVER_ADMISSION_MAX_TURN_END_S", "0")
