#!/usr/bin/env bash
# curl examples for the HTTP API (run as a test by tests/test_http_api.py::test_curl_examples).
#   BASE=http://127.0.0.1:8000 AUDIO=speech.wav bash docs/http_examples.sh
set -euo pipefail
BASE="${BASE:-http://127.0.0.1:8000}"
AUDIO="${AUDIO:?set AUDIO to an audio file (wav, mp3, m4a, flac, ogg, webm)}"

echo "### json"
curl -sS --fail-with-body "$BASE/v1/audio/transcriptions" \
  -F file=@"$AUDIO" -F model=whisper-1 -F language=en
echo

echo "### text"
curl -sS --fail-with-body "$BASE/v1/audio/transcriptions" -F file=@"$AUDIO" -F response_format=text

echo "### srt"
curl -sS --fail-with-body "$BASE/v1/audio/transcriptions" -F file=@"$AUDIO" -F response_format=srt

echo "### vtt"
curl -sS --fail-with-body "$BASE/v1/audio/transcriptions" -F file=@"$AUDIO" -F response_format=vtt

echo "### verbose_json"
curl -sS --fail-with-body "$BASE/v1/audio/transcriptions" -F file=@"$AUDIO" \
  -F response_format=verbose_json -F 'timestamp_granularities[]=word' -F 'timestamp_granularities[]=segment' \
  -F 'chunking_strategy={"type": "server_vad", "silence_duration_ms": 500, "prefix_padding_ms": 300, "threshold": 0.5}'
echo

echo "### translation"
# English text of speech in any language (needs a multilingual model, --model base, for speech
# that is not English; the English-only default transcribes English speech).
curl -sS --fail-with-body "$BASE/v1/audio/translations" -F file=@"$AUDIO" -F model=whisper-1 -F response_format=text

echo "### stream"
curl -sS -N --fail-with-body "$BASE/v1/audio/transcriptions" -F file=@"$AUDIO" \
  -F stream=true -F 'include[]=logprobs'

echo "### huggingface"
curl -sS --fail-with-body "$BASE/models/tiny.en" -H 'Content-Type: audio/wav' --data-binary @"$AUDIO"
echo

echo "### huggingface_json"
{ printf '{"inputs": "'; base64 -w0 "$AUDIO"; printf '", "parameters": {"return_timestamps": true}}'; } |
  curl -sS --fail-with-body "$BASE/models/tiny.en" -H 'Content-Type: application/json' \
    -H 'x-wait-for-model: true' --data-binary @-
echo

echo "### models"
curl -sS --fail-with-body "$BASE/v1/models"
echo

echo "### error"
# Errors are {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status.
curl -sS "$BASE/v1/audio/transcriptions" -F file=@"$AUDIO" -F model=no-such-model
echo
