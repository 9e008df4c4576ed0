"""Model registry and settings: bundled models, names, paths, precedence of flags over env."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from stream_server import settings as settings_mod
from stream_server.models import ModelRegistry, assemble_base, base_available, tiny_en_path


def registry(tmp_path: Path, loaded: list[str]) -> ModelRegistry:
    def factory(path: str):
        loaded.append(path)

        class Loaded:
            multilingual = "base" in path

        return Loaded()

    return ModelRegistry(default="tiny.en", cache_dir=tmp_path, factory=factory)


def test_tiny_en_is_bundled_and_loaded_once(tmp_path: Path) -> None:
    loaded: list[str] = []
    reg = registry(tmp_path, loaded)
    assert (tiny_en_path() / "model.bin").is_file()
    assert reg.get("tiny.en") is reg.get("tiny.en")
    assert loaded == [str(tiny_en_path())]


def test_names_that_exist_and_names_that_do_not(tmp_path: Path) -> None:
    reg = registry(tmp_path, [])
    assert reg.exists("tiny.en")
    assert reg.exists("large-v3")  # a faster-whisper name: downloaded when online
    assert reg.exists("Systran/faster-whisper-small")  # a hub id
    assert reg.exists(str(tiny_en_path()))  # a local CTranslate2 directory
    assert not reg.exists("no-such-model")
    assert not reg.exists(str(tmp_path))  # a directory without model.bin
    with pytest.raises(LookupError):
        reg.get("no-such-model")


def test_which_languages_a_model_speaks_by_name_and_once_loaded(tmp_path: Path) -> None:
    reg = registry(tmp_path, [])
    assert reg.speaks("tiny.en", "en-US") and reg.speaks("tiny.en", "EN")
    assert not reg.speaks("tiny.en", "fr") and not reg.speaks("Systran/faster-whisper-small.en", "de")
    assert reg.speaks("small", "fr") and reg.speaks("base", "pt_BR")
    local = tmp_path / "my-whisper"  # a directory's name says nothing: the loaded model does
    (local / "model.bin").parent.mkdir()
    (local / "model.bin").write_bytes(b"")
    assert reg.speaks(str(local), "fr"), "unknown until loaded: assumed multilingual"
    reg.get(str(local))  # the fake factory loads an English-only model for any path without "base"
    assert not reg.speaks(str(local), "fr") and reg.speaks(str(local), "en")


@pytest.mark.skipif(not base_available(), reason="the [base] extra is not installed")
def test_base_is_assembled_once_from_its_two_packages(tmp_path: Path) -> None:
    target = assemble_base(tmp_path)
    model = target / "model.bin"
    first = model.stat().st_mtime_ns
    assert {p.name for p in target.iterdir()} >= {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert assemble_base(tmp_path) == target and model.stat().st_mtime_ns == first
    from stream_server.decoding import WhisperDecoder

    assert WhisperDecoder(str(target), compute_type="int8").multilingual


def test_flags_beat_environment_beat_defaults() -> None:
    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser)
    env = {"STREAM_SERVER_PORT": "9001", "STREAM_SERVER_MODEL": "base", "STREAM_SERVER_IDLE_TIMEOUT_S": "2.5"}
    s = settings_mod.from_sources(parser.parse_args(["--port", "9002"]), env)
    assert (s.port, s.model, s.idle_timeout_s, s.host) == (9002, "base", 2.5, "127.0.0.1")
    assert settings_mod.Settings().resolved_compute_type() == "int8"


def test_decode_workers_and_threads_share_out_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_mod.os, "cpu_count", lambda: 8)
    auto = settings_mod.Settings()
    assert (auto.resolved_decode_workers(), auto.resolved_cpu_threads()) == (2, 4)
    assert settings_mod.Settings(device="cuda").resolved_decode_workers() == 1, "one worker keeps GPU batches whole"
    assert settings_mod.Settings(decode_workers=1).resolved_cpu_threads() == 8
    assert settings_mod.Settings(decode_workers=2).resolved_cpu_threads() == 4
    assert settings_mod.Settings(decode_workers=3).resolved_cpu_threads() == 2
    assert settings_mod.Settings(decode_workers=1, cpu_threads=6).resolved_cpu_threads() == 6
    monkeypatch.setattr(settings_mod.os, "cpu_count", lambda: 1)
    assert settings_mod.Settings(decode_workers=2).resolved_cpu_threads() == 1
    assert settings_mod.Settings().resolved_decode_workers() == 1, "one core: one worker"


def test_every_setting_is_documented_in_the_readme() -> None:
    """The README's configuration table lists every flag the server has."""
    import dataclasses

    from stream_server.settings import Settings
    from tests.support import REPO

    readme = (REPO / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"| `--{f.name.replace('_', '-')}` |" not in readme]
    assert not missing, f"settings without a README row: {missing}"
