"""Real-time streaming speech-to-text server."""

import os

__version__ = "0.1.0"

# ONNX Runtime (the Silero VAD's runtime) sends usage telemetry to Microsoft from its official
# Linux and macOS builds since 1.29: at its first session it writes a persistent device id and an
# event cache under ~/.cache/Microsoft/DeveloperTools/.onnxruntime and uploads to
# mobile.events.data.microsoft.com (seen here with 1.32: a DNS lookup of that host from an idle
# server). A server that hears phone calls and promises to run offline must not, so the opt-out is
# set before anything in this package can load ONNX Runtime (it is read once, when the runtime
# starts). An operator who wants the telemetry sets ORT_DISABLE_TELEMETRY=0 themselves.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
