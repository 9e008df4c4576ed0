"""The browser captions app: static files served by the server itself (``docs/browser.md``).

``GET /`` is the speaker page (microphone → ``/v1/stream`` → live captions), ``/?mode=overlay``
the same captions as a one- or two-line overlay for OBS browser sources, ``/watch/{session_id}``
the audience page (another session's captions from ``GET /v1/sessions/{id}/events``). Everything
the page needs is in ``static/``: no CDN, so it works offline.
"""
