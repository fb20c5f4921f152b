"""The `vq` format's model and stream: nearest codes, flags, exact round trips, and damaged streams refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from latentd.archive.coding import coder_for, format_of, load_coding_model
from latentd.archive.entropy_coder import EntropyStreamError
from latentd.archive.index_coder import HEADER, IndexCoder, decode_indices, encode_indices, stream_header
from latentd.archive.index_model import (LEFT, LITERAL, UP, IndexModel, IndexModelConfig, IndexTrainer, flags_of)
from latentd.archive.quantize import entropy_format, load, store


def _model(codebook_size: int = 16, dim: int = 3, seed: int = 0, scaling: float = 1.0, shift: float = 0.0,
           train: list[np.ndarray] | None = None) -> IndexModel:
    rng = np.random.default_rng(seed)
    trainer = IndexTrainer(rng.normal(size=(codebook_size, dim)).astype(np.float32))
    for indices in train or [rng.integers(0, codebook_size, size=(6, 7))]:
        trainer.count(indices)
    return trainer.model(IndexModelConfig("vq-test", scaling, shift, codebook_size, dim, images=1))


def _blocky(rng, shape=(12, 17), codes=16) -> np.ndarray:
    """Indices with runs and repeated rows, as a VQ model gives on smooth images."""
    rows = [rng.integers(0, codes, size=shape[1])]
    for _ in range(shape[0] - 1):
        row = rows[-1].copy() if rng.random() < 0.4 else rng.integers(0, codes, size=shape[1])
        runs = rng.random(shape[1]) < 0.5
        for col in np.nonzero(runs)[0]:
            if col:
                row[col] = row[col - 1]
        rows.append(row)
    return np.stack(rows)


def test_flags_name_the_neighbour_each_index_repeats():
    indices = np.array([[1, 1, 2],
                        [3, 1, 2],
                        [3, 3, 5]])
    assert flags_of(indices).tolist() == [[LITERAL, LEFT, LITERAL],
                                          [LITERAL, UP, UP],
                                          [UP, LEFT, LITERAL]]


def test_trainer_counts_flags_and_literal_codes():
    trainer = IndexTrainer(np.zeros((8, 2), np.float32))
    trainer.count(np.array([[1, 1, 2], [3, 1, 2], [3, 3, 5]]))
    assert trainer.flags.tolist() == [2, 3, 4]  # left, up, literal
    assert np.nonzero(trainer.counts)[0].tolist() == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="outside the codebook"):
        trainer.count(np.array([[8]]))
    with pytest.raises(ValueError, match="integers"):
        trainer.count(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("seed", range(5))
def test_indices_round_trip_exactly(seed):
    rng = np.random.default_rng(seed)
    model = _model(train=[_blocky(rng) for _ in range(4)])
    for shape in [(1, 1), (1, 9), (9, 1), (12, 17)]:
        indices = _blocky(rng, shape)
        stream = encode_indices(indices, model)
        assert decode_indices(stream, model, shape).tolist() == indices.tolist()
        assert stream_header(stream)["shape"] == list(shape)


def test_flags_make_repetitive_indices_cheaper_than_literals():
    rng = np.random.default_rng(1)
    model = _model(train=[_blocky(rng) for _ in range(8)])
    blocky = _blocky(rng, (32, 32))
    noise = rng.integers(0, 16, size=(32, 32))
    assert len(encode_indices(blocky, model)) < 0.8 * len(encode_indices(noise, model))


def test_nearest_is_the_closest_code_in_raw_space():
    model = _model(scaling=0.5, shift=0.25)
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(3, 5, 4)).astype(np.float32)
    coder = IndexCoder(model)
    raw = latents / 0.5 + 0.25
    distances = ((raw.reshape(3, -1).T[:, None, :] - model.codebook[None]) ** 2).sum(-1)
    assert coder.nearest(latents).ravel().tolist() == distances.argmin(axis=1).tolist()
    # the stored latents are the codes' vectors, scaled as the latents were
    restored = coder.decode(coder.encode(latents), latents.shape)
    expected = (model.codebook[coder.nearest(latents)].transpose(2, 0, 1) - 0.25) * 0.5
    np.testing.assert_allclose(restored, expected, rtol=1e-6, atol=1e-6)
    # codebook vectors are their own nearest code: storing them again changes nothing
    assert coder.decode(coder.encode(restored), latents.shape).tolist() == restored.tolist()


def test_nearest_refuses_latents_the_codebook_cannot_hold():
    coder = IndexCoder(_model())
    with pytest.raises(ValueError, match=r"\[3, h, w\]"):
        coder.nearest(np.zeros((4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="not finite"):
        coder.nearest(np.full((3, 2, 2), np.nan, np.float32))


def test_the_vq_format_stores_and_loads_through_quantize():
    model = _model()
    fmt = entropy_format(coder_for(model))
    assert fmt.name == "vq" and fmt.label == "vq"
    latents = np.random.default_rng(0).normal(size=(3, 6, 5)).astype(np.float32)
    restored = load(store(latents, fmt), fmt, latents.shape)
    assert restored.shape == latents.shape and restored.dtype == np.float32
    with pytest.raises(ValueError, match="no step"):
        coder_for(model, 0.5)


def test_save_and_load_keep_the_digest(tmp_path):
    model = _model()
    model.save(tmp_path / "m")
    loaded = load_coding_model(tmp_path / "m")
    assert isinstance(loaded, IndexModel) and format_of(loaded) == "vq"
    assert loaded.digest == model.digest
    assert loaded.tables()[1].sum() == 1 << 24 and (loaded.tables()[1] >= 1).all()


def test_a_saved_model_with_a_changed_codebook_is_another_model(tmp_path):
    model = _model()
    other = IndexModel(model.config, model.codebook + 1e-3, model.counts, model.flags)
    assert other.digest != model.digest
    stream = encode_indices(np.zeros((2, 2), np.int64), model)
    with pytest.raises(EntropyStreamError, match="written by index model"):
        decode_indices(stream, other, (2, 2))


@pytest.mark.parametrize("change, message", [
    (lambda raw: {**raw, "kind": "pixels"}, "kind 'pixels'"),
    (lambda raw: {**raw, "codebook_size": 1}, "codebook_size"),
    (lambda raw: {**raw, "scaling_factor": 0}, "scaling_factor"),
    (lambda raw: {**raw, "surprise": 1}, "unknown fields surprise"),
])
def test_a_bad_config_is_refused_naming_the_field(tmp_path, change, message):
    import json

    _model().save(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=message):
        load_coding_model(tmp_path / "m")


def test_tables_that_do_not_match_the_config_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="do not match"):
        IndexModel(model.config, model.codebook[:-1], model.counts, model.flags)
    with pytest.raises(ValueError, match="not finite"):
        IndexModel(model.config, np.full_like(model.codebook, np.inf), model.counts, model.flags)
    with pytest.raises(ValueError, match="non-negative"):
        IndexModel(model.config, model.codebook, -model.counts - 1, model.flags)


@pytest.fixture
def stream_and_model():
    rng = np.random.default_rng(7)
    model = _model(train=[_blocky(rng) for _ in range(4)])
    indices = _blocky(rng, (10, 11))
    return encode_indices(indices, model), model, indices


def test_truncated_and_extended_streams_are_refused(stream_and_model):
    stream, model, indices = stream_and_model
    for bad, message in [(stream[:10], "header"), (stream[:-4], "ends early"), (stream + b"\0" * 4, "runs on"),
                         (b"XXXX" + stream[4:], "not a vq stream")]:
        with pytest.raises(EntropyStreamError, match=message):
            decode_indices(bad, model, indices.shape)
    with pytest.raises(EntropyStreamError, match="shape"):
        decode_indices(stream, model, (11, 10))


def _with_header(stream: bytes, **fields) -> bytes:
    names = ("magic", "zero", "digest", "height", "width", "literals", "words", "crc")
    values = dict(zip(names, HEADER.unpack_from(stream)))
    values.update(fields)
    return HEADER.pack(*(values[n] for n in names)) + stream[HEADER.size:]


def test_damaged_headers_and_words_are_refused_never_wrong_indices(stream_and_model):
    stream, model, indices = stream_and_model
    with pytest.raises(EntropyStreamError):
        decode_indices(_with_header(stream, literals=10 ** 6), model, indices.shape)
    with pytest.raises(EntropyStreamError):
        decode_indices(_with_header(stream, crc=0), model, indices.shape)
    rng = np.random.default_rng(0)
    for _ in range(50):  # flipped bits anywhere in the words: an error or, by luck, the exact indices
        damaged = bytearray(stream)
        at = int(rng.integers(HEADER.size, len(stream)))
        damaged[at] ^= 1 << int(rng.integers(0, 8))
        try:
            result = decode_indices(bytes(damaged), model, indices.shape)
        except EntropyStreamError:
            continue
        assert result.tolist() == indices.tolist()


def test_encode_refuses_indices_outside_the_codebook():
    model = _model()
    with pytest.raises(ValueError, match="outside the codebook"):
        encode_indices(np.array([[16]]), model)
    with pytest.raises(ValueError, match="integers"):
        encode_indices(np.zeros((2, 2), np.float32), model)


def test_another_process_decodes_the_same_indices(tmp_path, stream_and_model):
    stream, model, indices = stream_and_model
    model.save(tmp_path / "m")
    (tmp_path / "s.bin").write_bytes(stream)
    code = ("import numpy as np, sys; from latentd.archive.coding import load_coding_model; "
            "from latentd.archive.index_coder import decode_indices; "
            f"m = load_coding_model({str(tmp_path / 'm')!r}); "
            f"s = open({str(tmp_path / 's.bin')!r}, 'rb').read(); "
            f"print(decode_indices(s, m, {indices.shape}).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert bytes.fromhex(out) == np.ascontiguousarray(indices, np.int32).tobytes()


def test_flags_that_copy_from_outside_the_image_are_damage():
    from latentd.archive.index_coder import _rebuild

    with pytest.raises(EntropyStreamError, match="no neighbour"):
        _rebuild(np.array([[LEFT, LITERAL]], np.int8), np.array([1], np.int32))
    with pytest.raises(EntropyStreamError, match="no neighbour"):
        _rebuild(np.array([[LITERAL, UP]], np.int8), np.array([1], np.int32))
    assert _rebuild(np.array([[LITERAL, LEFT], [UP, LITERAL]], np.int8), np.array([4, 9], np.int32)).tolist() \
        == [[4, 4], [4, 9]]


def test_nearest_codes_are_float64s_choice_even_where_float32_cannot_tell():
    from latentd.archive.index_coder import nearest_codes

    rng = np.random.default_rng(5)
    codebook = rng.normal(size=(300, 4)).astype(np.float32)
    vectors = rng.normal(size=(500, 4))
    # vectors a hair off the midpoint of two codes: float32 distances tie, float64 ones do not
    a, b = codebook[:100].astype(np.float64), codebook[100:200].astype(np.float64)
    midpoints = (a + b) / 2 + rng.choice([-1e-9, 1e-9], size=(100, 1)) * (b - a)
    vectors = np.concatenate([vectors, midpoints])
    exact = ((vectors[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1)
    assert nearest_codes(vectors, codebook).tolist() == exact.argmin(axis=1).tolist()
    duplicated = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    assert nearest_codes(np.array([[1.0, 0.0], [0.5, 0.5]]), duplicated).tolist() == [0, 0]  # ties: lowest
