"""The random-weight Whisper builder produces a model CTranslate2 loads and runs (CPU only)."""

import json

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2")

from stream_server.bench.synthetic_model import (  # noqa: E402
    SHAPES,
    FixedLengthDecoder,
    build_synthetic_whisper,
    fixed_decode_kwargs,
    main,
    special_token_ids,
    whisper_vocabulary,
    write_loader_files,
)


@pytest.mark.parametrize(
    "name, eot, sot, no_timestamps",
    [("tiny.en", 50256, 50257, 50362), ("tiny", 50257, 50258, 50363), ("large-v3-turbo", 50257, 50258, 50364)],
)
def test_special_token_ids_match_real_tokenizers(name, eot, sot, no_timestamps):
    ids = special_token_ids(name)
    assert (ids["eot"], ids["sot"], ids["no_timestamps"]) == (eot, sot, no_timestamps)
    vocab = whisper_vocabulary(SHAPES[name].vocab_size)
    assert len(vocab) == SHAPES[name].vocab_size == len(set(vocab))
    assert vocab[-1] == "<|30.00|>"


def test_tiny_shape_loads_and_runs_on_cpu(tmp_path):
    shape = SHAPES["test-tiny"]
    out = build_synthetic_whisper(tmp_path / "m", shape="test-tiny", seed=1)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["suppress_ids_begin"] == [220, 50256]
    assert config["lang_ids"] == []

    model = ctranslate2.models.Whisper(out, device="cpu", compute_type="float32", intra_threads=1)
    assert model.n_mels == shape.n_mels
    assert not model.is_multilingual

    rng = np.random.default_rng(0)
    ids = special_token_ids("test-tiny")
    prompt = [ids["sot"], ids["no_timestamps"]]
    for frames in (1000, 3000):  # 10 s and 30 s windows
        features = rng.standard_normal((2, shape.n_mels, frames), dtype=np.float32)
        encoded = model.encode(ctranslate2.StorageView.from_array(features))
        assert list(encoded.shape) == [2, frames // 2, shape.d_model]
        encoded_np = np.array(encoded)
        assert np.isfinite(encoded_np).all()

        # Fixed decode length: the end token is suppressed, so every sequence runs to the limit,
        # with a bare prompt and with a previous-text prompt (<|startofprev|> + 30 tokens).
        prev_prompt = [ids["startofprev"]] + list(range(100, 130)) + prompt
        prefix_prompt = prompt + list(range(200, 220))  # text prefix after the task tokens
        for p in (prompt, prev_prompt, prefix_prompt):
            results = model.generate(
                encoded, [p, p], beam_size=1, **fixed_decode_kwargs(12, p, ids)
            )
            for result in results:
                tokens = result.sequences_ids[0]
                assert len(tokens) == 12
                assert ids["eot"] not in tokens
                assert all(0 <= t < shape.vocab_size for t in tokens)


def test_same_seed_same_weights_and_cli(tmp_path):
    build_synthetic_whisper(tmp_path / "a", shape="test-tiny", seed=3)
    assert main([str(tmp_path / "b"), "--shape", "test-tiny", "--seed", "3"]) == 0
    a = (tmp_path / "a" / "model.bin").read_bytes()
    assert a == (tmp_path / "b" / "model.bin").read_bytes()
    with pytest.raises(FileExistsError):
        build_synthetic_whisper(tmp_path / "a", shape="test-tiny", seed=3)


def test_fixed_length_decoder_keeps_exactly_n_tokens(tmp_path):
    """The bench's decoder loads a synthetic model offline (loader files) and, without timestamp
    tokens, keeps exactly N text tokens of every request, whatever its audio, prompt or prefix."""
    from stream_server.decoding import DecodeRequest

    kept: list[list[int]] = []

    class Spy(FixedLengthDecoder):
        def _kept_tokens(self, requests, tokenizers, new_tokens):
            kept.extend(super()._kept_tokens(requests, tokenizers, new_tokens))
            return kept[-len(requests) :]

    out = build_synthetic_whisper(tmp_path / "m", shape="test-tiny", seed=1, quantization="float32")
    write_loader_files(out, "test-tiny")
    decoder = Spy(out, new_tokens=7, compute_type="float32", timestamp_tokens=False)
    rng = np.random.default_rng(0)
    requests = [
        DecodeRequest(rng.normal(0, 0.1, 16000).astype(np.float32)),
        DecodeRequest(rng.normal(0, 0.1, 48000).astype(np.float32)),
        DecodeRequest(rng.normal(0, 0.1, 32000).astype(np.float32), prefix=tuple(range(300, 310)), prompt="earlier text"),
    ]
    assert len(decoder.decode_batch(requests)) == 3
    assert [len(k) for k in kept] == [7, 7, 7]
    eot = special_token_ids("test-tiny")["eot"]
    assert all(t < eot for k in kept for t in k)
    with pytest.raises(ValueError):
        FixedLengthDecoder(out, new_tokens=0)
