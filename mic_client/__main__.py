"""``python -m mic_client`` runs the same entry point as the ``mic-client`` console script.

Useful when the package is importable but not installed (no console script on PATH), e.g. from a
source checkout.
"""

from mic_client.cli import entry

entry()
