"""Test-wide settings for the servers the tests start.

Admission control (``--admission-max-final-wait-s``) refuses new sessions while final decodes run
late. That is a capacity decision, measured by ``stream-server bench``; on a CI machine shared with
other jobs it would turn machine noise into refused sessions in functional tests. Every server a
test starts inherits this environment, so it is off unless a test turns it on
(tests/test_readiness.py does, in-process).
"""

import os

os.environ.setdefault("STREAM_SERVER_ADMISSION_MAX_FINAL_WAIT_S", "0")
