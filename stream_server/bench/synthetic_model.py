"""Build a CTranslate2 Whisper model with a real model's *shape* and random weights.

Used to measure GPU/CPU throughput (encoder time, decode time, memory) of a given Whisper size
on machines where the real weights cannot be fetched. The outputs are meaningless text, so the
model is only valid for timing, and only when decode lengths are fixed by the caller: use
:func:`fixed_decode_kwargs` (suppresses the end token and picks ``max_length`` so that exactly N
new tokens are generated, previous-text prompts included) with CTranslate2 directly, or
:class:`FixedLengthDecoder` in place of the server's decoder.

The builder fills a :class:`ctranslate2.specs.WhisperSpec` the same way CTranslate2's
Transformers converter lays out a converted Whisper checkpoint (fused QKV for self-attention,
fused KV for cross-attention, zero key bias, tied output projection, sinusoidal encoder
positions), writes ``model.bin``, ``config.json`` (suppress ids, alignment heads, language ids)
and ``vocabulary.json`` with the special tokens at the same ids as the real tokenizer, so
prompt token ids such as ``<|startoftranscript|>`` match the real model of that size.

CLI::

    python -m stream_server.bench.synthetic_model OUT_DIR [--shape large-v3-turbo] [--seed 0]
        [--quantization float16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from stream_server.decoding import DecodeRequest, Tokenizer, WhisperDecoder

__all__ = [
    "SHAPES",
    "FixedLengthDecoder",
    "WhisperShape",
    "build_synthetic_whisper",
    "fixed_decode_kwargs",
    "special_token_ids",
    "whisper_vocabulary",
    "write_loader_files",
]

# Whisper's language codes, in token order (the 100th, "yue", exists in v3 vocabularies only).
_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su yue"
).split()

_NUM_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps


@dataclasses.dataclass(frozen=True)
class WhisperShape:
    """Architecture hyper-parameters of a Whisper model (the fields of OpenAI's ModelDimensions)."""

    n_mels: int
    d_model: int
    encoder_layers: int
    encoder_heads: int
    decoder_layers: int
    decoder_heads: int
    vocab_size: int
    n_audio_ctx: int = 1500  # encoder positions = input frames // 2 (3000 frames = 30 s)
    n_text_ctx: int = 448  # decoder positions

    @property
    def multilingual(self) -> bool:
        return self.vocab_size >= 51865

    @property
    def num_languages(self) -> int:
        # 51864 (.en) and 51865 (multilingual v1/v2) carry 99 language tokens; 51866 (v3) 100.
        return _num_languages(self.vocab_size)


SHAPES: dict[str, WhisperShape] = {
    "tiny.en": WhisperShape(80, 384, 4, 6, 4, 6, 51864),
    "tiny": WhisperShape(80, 384, 4, 6, 4, 6, 51865),
    "base.en": WhisperShape(80, 512, 6, 8, 6, 8, 51864),
    "base": WhisperShape(80, 512, 6, 8, 6, 8, 51865),
    "small.en": WhisperShape(80, 768, 12, 12, 12, 12, 51864),
    "small": WhisperShape(80, 768, 12, 12, 12, 12, 51865),
    "medium.en": WhisperShape(80, 1024, 24, 16, 24, 16, 51864),
    "medium": WhisperShape(80, 1024, 24, 16, 24, 16, 51865),
    "large-v2": WhisperShape(80, 1280, 32, 20, 32, 20, 51865),
    "large-v3": WhisperShape(128, 1280, 32, 20, 32, 20, 51866),
    "large-v3-turbo": WhisperShape(128, 1280, 32, 20, 4, 20, 51866),
    # Not a real Whisper size: a few-MB model for unit tests (English-only vocabulary layout).
    "test-tiny": WhisperShape(80, 64, 2, 4, 2, 4, 51864),
}


def _num_text_tokens(vocab_size: int) -> int:
    return 50257 if vocab_size >= 51865 else 50256


def _num_languages(vocab_size: int) -> int:
    # text tokens + <|endoftext|>, <|startoftranscript|> + languages + 6 task tokens + timestamps
    return vocab_size - _num_text_tokens(vocab_size) - 2 - 6 - _NUM_TIMESTAMPS


def whisper_vocabulary(vocab_size: int) -> list[str]:
    """Token strings with Whisper's special tokens at their real ids.

    Text tokens get placeholder names (CTranslate2 only looks special tokens up by name;
    text decoding is done by the tokenizer outside the model).
    """
    num_languages = _num_languages(vocab_size)
    if num_languages not in (99, 100):
        raise ValueError("unsupported Whisper vocabulary size %d" % vocab_size)
    num_text = _num_text_tokens(vocab_size)
    tokens = ["<|t%d|>" % i for i in range(num_text)]
    tokens += ["<|endoftext|>", "<|startoftranscript|>"]
    tokens += ["<|%s|>" % lang for lang in _LANGUAGES[:num_languages]]
    tokens += [
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    tokens += ["<|%.2f|>" % (i * 0.02) for i in range(_NUM_TIMESTAMPS)]
    assert len(tokens) == vocab_size, (len(tokens), vocab_size)
    return tokens


def special_token_ids(shape: str | WhisperShape) -> dict[str, int]:
    """Ids of the special tokens a caller needs to build prompts for this shape."""
    shape = _resolve_shape(shape)
    vocab = whisper_vocabulary(shape.vocab_size)
    first_special = _num_text_tokens(shape.vocab_size)
    index = {tok: i for i, tok in enumerate(vocab[first_special:], first_special)}
    ids = {
        "eot": index["<|endoftext|>"],
        "sot": index["<|startoftranscript|>"],
        "translate": index["<|translate|>"],
        "transcribe": index["<|transcribe|>"],
        "startofprev": index["<|startofprev|>"],
        "no_speech": index["<|nocaptions|>"],
        "no_timestamps": index["<|notimestamps|>"],
        "timestamp_begin": index["<|0.00|>"],
    }
    if shape.multilingual:
        ids["en"] = index["<|en|>"]
    return ids


def fixed_decode_kwargs(new_tokens: int, prompt: list[int], ids: dict[str, int]) -> dict[str, object]:
    """``Whisper.generate`` keyword arguments that make every sequence exactly ``new_tokens`` long.

    ``ids`` is :func:`special_token_ids` of the model's shape. The end-of-text token is suppressed
    (on top of the model's default suppress list) and ``max_length`` is chosen for CTranslate2's
    limit of ``min(max_length // 2, max_length - start_step)`` new tokens, where ``start_step`` is
    the number of prompt tokens fed before decoding starts: the previous-text tokens before
    ``<|startoftranscript|>`` plus the task tokens after it, except the last one.
    """
    if new_tokens < 1:
        raise ValueError("new_tokens must be >= 1")
    try:
        index = prompt.index(ids["sot"])
    except ValueError:
        raise ValueError("the prompt has no <|startoftranscript|> token") from None
    # Task tokens are the ids from <|startoftranscript|> to <|notimestamps|> (languages, task...).
    while index < len(prompt) and ids["sot"] <= prompt[index] <= ids["no_timestamps"]:
        index += 1
    start_step = index - 1
    return {
        "max_length": max(2 * new_tokens, new_tokens + start_step),
        "suppress_tokens": [-1, ids["eot"]],
    }


class FixedLengthDecoder(WhisperDecoder):
    """The server's decoder with every decode's length fixed, for random-weight models.

    A synthetic model's text is noise, and the production decoder's guards (timestamps past the
    audio, squeezed tails, echo and loop filters) cut noise to arbitrary lengths, so decode work
    would be anything. Here each request runs ``new_tokens`` + 4 generation steps (end-of-text
    suppressed; the 4 stand for the timestamp tokens a real decode also emits) and keeps its first
    ``new_tokens`` text tokens, skipping the inside-the-audio filter: decode work is a realistic
    constant. Everything else (features, encode, batching, align) is the production path.
    """

    TIMESTAMP_STEPS = 4

    def __init__(self, model_path: str, *, new_tokens: int, **options: Any) -> None:
        if new_tokens < 1:
            raise ValueError("new_tokens must be >= 1")
        super().__init__(model_path, **options)
        self.new_tokens = new_tokens

    def _generation_limits(
        self, requests: Sequence[DecodeRequest], prompts: list[list[int]], tokenizers: list[Tokenizer]
    ) -> tuple[int, list[int]]:
        # CTranslate2 generates at most min(max_length // 2, max_length - start_step) steps, the
        # forced prefix included.
        steps = self.new_tokens + self.TIMESTAMP_STEPS
        max_length = max(max(len(p) + steps, 2 * (len(r.prefix) + steps + 1)) for p, r in zip(prompts, requests))
        return min(448, max_length), [-1, tokenizers[0].eot]

    def _kept_tokens(
        self, requests: Sequence[DecodeRequest], tokenizers: list[Tokenizer], new_tokens: list[list[int]]
    ) -> list[list[int]]:
        return [[t for t in tokens if t < tok.eot][: self.new_tokens] for tokens, tok in zip(new_tokens, tokenizers)]


def _resolve_shape(shape: str | WhisperShape) -> WhisperShape:
    if isinstance(shape, WhisperShape):
        return shape
    try:
        return SHAPES[shape]
    except KeyError:
        raise ValueError("unknown shape %r (known: %s)" % (shape, ", ".join(SHAPES))) from None


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder position embeddings."""
    half = channels // 2
    log_timescale_increment = np.log(max_timescale) / (half - 1)
    inv_timescales = np.exp(-log_timescale_increment * np.arange(half, dtype=np.float64))
    scaled_time = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


class _Filler:
    """Deterministic random weights, scaled so fp16 activations stay finite.

    The ``spec`` arguments are CTranslate2 layer specs (``ctranslate2.specs``, untyped: ``Any``).
    """

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int, std: float = 0.02) -> np.ndarray:
        out = self.rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(std)
        return out

    def linear(
        self, spec: Any, out_features: int, in_features: int, bias: bool = True, zero_bias_rows: slice | None = None
    ) -> None:
        spec.weight = self.normal(out_features, in_features)
        if bias:
            b = self.normal(out_features, std=0.01)
            if zero_bias_rows is not None:
                b[zero_bias_rows] = 0.0  # Whisper's key projection has no bias
            spec.bias = b

    @staticmethod
    def layer_norm(spec: Any, dim: int) -> None:
        spec.gamma = np.ones(dim, dtype=np.float32)
        spec.beta = np.zeros(dim, dtype=np.float32)

    def self_attention(self, spec: Any, d: int) -> None:
        self.linear(spec.linear[0], 3 * d, d, zero_bias_rows=slice(d, 2 * d))  # fused q, k, v
        self.linear(spec.linear[1], d, d)
        self.layer_norm(spec.layer_norm, d)

    def cross_attention(self, spec: Any, d: int) -> None:
        self.linear(spec.linear[0], d, d)  # q
        self.linear(spec.linear[1], 2 * d, d, zero_bias_rows=slice(0, d))  # fused k, v
        self.linear(spec.linear[2], d, d)
        self.layer_norm(spec.layer_norm, d)

    def ffn(self, spec: Any, d: int) -> None:
        self.linear(spec.linear_0, 4 * d, d)
        self.linear(spec.linear_1, d, 4 * d)
        self.layer_norm(spec.layer_norm, d)


def _suppress_ids(vocab_size: int) -> list[int]:
    # Stand-in for Whisper's ~90 suppressed punctuation/symbol token ids: same count and range,
    # so the logits masking costs the same. Fixed list, independent of the seed.
    num_text = _num_text_tokens(vocab_size)
    return sorted({1 + (i * 557) % (num_text - 1) for i in range(88)})


def build_synthetic_whisper(
    out_dir: str | os.PathLike[str],
    shape: str | WhisperShape = "large-v3-turbo",
    seed: int = 0,
    quantization: str | None = "float16",
) -> str:
    """Write a CTranslate2 Whisper model of the given shape with random weights to ``out_dir``.

    Args:
      out_dir: Output directory (created; must not already contain a model).
      shape: A key of :data:`SHAPES` (e.g. ``"large-v3-turbo"``, ``"tiny.en"``) or a
        :class:`WhisperShape`.
      seed: Seed for the random weights (same seed and shape give identical files).
      quantization: Weight type stored in ``model.bin`` (as CTranslate2's converters'
        ``--quantization``: ``float16`` like faster-whisper's published models, ``float32``,
        ``int8`` ...). Any compute type can still be chosen at load time.

    Returns:
      ``out_dir`` as a string.
    """
    from ctranslate2.specs import whisper_spec

    shape = _resolve_shape(shape)
    d = shape.d_model
    if d % shape.encoder_heads or d % shape.decoder_heads:
        raise ValueError("d_model must be divisible by the number of heads")

    spec = whisper_spec.WhisperSpec(
        shape.encoder_layers, shape.encoder_heads, shape.decoder_layers, shape.decoder_heads
    )
    fill = _Filler(seed)

    enc = spec.encoder
    enc.conv1.weight = fill.normal(d, shape.n_mels, 3)
    enc.conv1.bias = fill.normal(d, std=0.01)
    enc.conv2.weight = fill.normal(d, d, 3)
    enc.conv2.bias = fill.normal(d, std=0.01)
    enc.position_encodings.encodings = _sinusoids(shape.n_audio_ctx, d)
    fill.layer_norm(enc.layer_norm, d)
    for layer in enc.layer:
        fill.self_attention(layer.self_attention, d)
        fill.ffn(layer.ffn, d)

    dec = spec.decoder
    dec.embeddings.weight = fill.normal(shape.vocab_size, d)
    dec.position_encodings.encodings = fill.normal(shape.n_text_ctx, d, std=0.01)
    fill.layer_norm(dec.layer_norm, d)
    for layer in dec.layer:
        fill.self_attention(layer.self_attention, d)
        fill.cross_attention(layer.attention, d)
        fill.ffn(layer.ffn, d)
    # Whisper ties the output projection to the token embeddings (saved once, as an alias).
    dec.projection.weight = dec.embeddings.weight

    tokens = whisper_vocabulary(shape.vocab_size)
    spec.register_vocabulary(tokens)
    ids = special_token_ids(shape)
    config = spec.config
    config.suppress_ids = _suppress_ids(shape.vocab_size)
    config.suppress_ids_begin = [220, ids["eot"]]
    config.lang_ids = (
        [ids["sot"] + 1 + i for i in range(shape.num_languages)] if shape.multilingual else []
    )
    # Same default as the converter when no alignment heads are known: last half of the layers.
    config.alignment_heads = [
        [layer, head]
        for layer in range(shape.decoder_layers // 2, shape.decoder_layers)
        for head in range(shape.decoder_heads)
    ]

    spec.validate()
    spec.optimize(quantization=quantization)

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "model.bin")):
        raise FileExistsError("%s already contains a model.bin" % out_dir)
    spec.save(out_dir)
    with open(os.path.join(out_dir, "synthetic.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "synthetic": True,
                "note": "random weights: valid for timing only, with fixed decode lengths",
                "shape": dataclasses.asdict(shape),
                "seed": seed,
                "quantization": quantization,
                "special_token_ids": ids,
            },
            f,
            indent=2,
        )
    return out_dir


def write_loader_files(out_dir: str | os.PathLike[str], shape: str | WhisperShape, tokenizer_from: str | None = None) -> None:
    """What faster-whisper needs besides ``model.bin`` to load a synthetic model offline.

    Without a ``tokenizer.json`` it would fetch one from the Hugging Face hub. Written: a
    tokenizer.json (``tokenizer_from``'s byte-level BPE, tiny.en's by default, for the text ids;
    Whisper's special tokens at the ids of ``shape``'s vocabulary) and a preprocessor_config.json
    with the shape's mel count.
    """
    dims = _resolve_shape(shape)
    if tokenizer_from is None:
        from stream_server.models import tiny_en_path

        tokenizer_from = os.path.join(tiny_en_path(), "tokenizer.json")
    with open(tokenizer_from, encoding="utf-8") as f:
        tok = json.load(f)
    vocab = whisper_vocabulary(dims.vocab_size)
    eot = vocab.index("<|endoftext|>")
    bpe = {t: i for t, i in tok["model"]["vocab"].items() if i < eot and not t.startswith("<|")}
    used = set(bpe.values())
    for i in range(eot):  # multilingual vocabularies have one more text id than GPT-2's
        if i not in used:
            bpe[f"<|pad{i}|>"] = i
    tok["model"]["vocab"] = bpe
    tok["added_tokens"] = [
        {"id": i, "content": vocab[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i in range(eot, dims.vocab_size)
    ]
    tok["post_processor"] = None
    preprocessor = {"feature_size": dims.n_mels, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400}
    for name, content in (("tokenizer.json", tok), ("preprocessor_config.json", preprocessor)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream_server.bench.synthetic_model",
        description="Write a random-weight CTranslate2 Whisper model of a real model's shape "
        "(for throughput measurements only).",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--shape", default="large-v3-turbo", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quantization",
        default="float16",
        help="weight type stored in model.bin (float16, float32, int8, int8_float16, ...)",
    )
    args = parser.parse_args(argv)
    build_synthetic_whisper(args.out_dir, args.shape, args.seed, args.quantization)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
