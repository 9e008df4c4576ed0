#!/usr/bin/env bash
# Install what the mic-client tests need to exercise the real capture path without a sound card:
#
#   libportaudio2       PortAudio, which the `sounddevice` module loads at import time
#   pulseaudio          the sound server; the test starts a private instance with a null sink whose
#                       monitor source is the "virtual microphone" and plays a speech WAV into it
#   pulseaudio-utils    paplay / pactl, used by the test to feed and inspect that server
#   libasound2-plugins  ALSA's "pulse" PCM, through which PortAudio (ALSA host API) reaches PulseAudio
#   alsa-utils          arecord / aplay, for debugging the chain by hand
#
# The test itself starts and stops the PulseAudio daemon (see tests/test_mic_client_e2e.py); this
# script only installs packages. It is idempotent and skips apt entirely when everything is present.
# Debian/Ubuntu only; elsewhere the virtual-microphone test skips with a reason.
set -euo pipefail

packages=(libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins alsa-utils)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup_virtual_mic: all packages present (${packages[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_virtual_mic: apt-get not found; install ${missing[*]} by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "setup_virtual_mic: need root (or sudo) to install ${missing[*]}" >&2
        exit 1
    fi
fi

echo "setup_virtual_mic: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: pulling in a desktop's worth of audio tools is not needed for a null sink.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
pulseaudio --version
