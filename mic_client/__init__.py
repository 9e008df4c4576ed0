"""``mic-client``: stream a microphone or an audio file to ``stream-server`` and show live captions.

The package is split so that the parts with no I/O can be tested on their own:

* :mod:`mic_client.audio_source` -- microphone and file sources, both async iterators of pcm16 bytes;
* :mod:`mic_client.captions` -- the terminal caption renderer, a pure event -> screen-text class;
* :mod:`mic_client.writers` -- the ``--output`` writers (JSON Lines, SRT);
* :mod:`mic_client.client` -- the WebSocket protocol loop (see ``protocol.md``);
* :mod:`mic_client.cli` -- argument parsing, signal handling and exit codes.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
