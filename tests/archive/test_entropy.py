"""The entropy format's model and coder: integer tables, exact decoding in another process, damaged streams."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from latentd.archive.entropy_coder import HEADER, EntropyCoder, EntropyStreamError, decode_symbols
from latentd.archive.entropy_model import (PRECISION, EntropyModelConfig, coarse_index, load_entropy_model,
                                           normalise, train_model)
from latentd.archive.quantize import entropy_format, get_format, load, store

SCALES = np.array([1.0, 2.5, 0.3, 4.0], np.float32)[:, None, None]


def _latents(seed: int, height: int = 24, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.laplace(0.2, 1.0, (4, height, width)) * SCALES).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return train_model([_latents(seed) for seed in range(8)], EntropyModelConfig("test-vae", 0.5, 0.1, 4),
                       np.array([1.0, 0.5, 4.0, 2.0]))


def test_tables_are_integers_summing_to_the_coder_precision(model):
    for bins in (1, 7, 32, 64, 200):
        tables = model.tables(bins)
        for weights in tables.weights:
            assert weights.dtype == np.int64 and weights.min() >= 1 and weights.sum() == 1 << PRECISION
    assert normalise(np.array([4, 1, 2]), 16).tolist() == [10, 2, 4]  # 1 + w * 13 // 7, the rest to the largest
    # Fine bin i belongs to coarse round(i / bins), halves up.
    assert coarse_index(np.array([-3, -2, -1, 0, 1, 2, 3]), 4).tolist() == [-1, 0, 0, 0, 0, 1, 1]


def test_model_saves_and_loads_with_the_same_digest(model, tmp_path):
    model.save(tmp_path / "entropy")
    loaded = load_entropy_model(tmp_path / "entropy")
    assert loaded.digest == model.digest and loaded.config == model.config
    np.testing.assert_array_equal(loaded.counts, model.counts)
    (tmp_path / "entropy" / "config.json").write_text('{"vae": "x", "extra": 1}')
    with pytest.raises(ValueError, match="unknown fields extra"):
        load_entropy_model(tmp_path / "entropy")
    with pytest.raises(ValueError, match="not an entropy model"):
        load_entropy_model(tmp_path / "nowhere")


@pytest.mark.parametrize("step", [0.1, 0.5, 2.0])
def test_round_trip_is_within_half_a_step_and_escapes_are_exact(model, step):
    latents = _latents(100)
    latents[0, 0, 0], latents[3, 5, 7], latents[1, 2, 3] = 400.0, -1e4, 3e38  # far outside the tables
    coder = EntropyCoder(model, step)
    back = load(store(latents, entropy_format(coder)), entropy_format(coder), latents.shape)
    steps = coder.steps(coder.bins)[:, None, None]
    inside = np.abs(latents) < 1e6
    assert (np.abs(back - latents)[inside] <= (steps / 2 * 1.0001 + 1e-6).repeat(24, 1).repeat(32, 2)[inside]).all()
    symbols = coder.quantize(latents)
    np.testing.assert_array_equal(decode_symbols(coder.encode(latents), model, latents.shape)[0], symbols)


def test_units_follow_the_decoders_sensitivity(model):
    from latentd.archive.entropy_model import units

    # Steps in proportion to 1 / sqrt(sensitivity), with the standard deviations' geometric mean.
    ratio = model.unit / model.unit[0]
    np.testing.assert_allclose(ratio, [1.0, 2 ** 0.5, 0.5, 0.5 ** 0.5], rtol=1e-5)
    assert np.exp(np.log(model.unit).mean()) == pytest.approx(np.exp(np.log(model.std).mean()), rel=1e-5)
    np.testing.assert_array_equal(units(model.std, None), model.std)
    np.testing.assert_allclose(units(np.ones(2), np.array([1.0, 1e12])), [8.0, 0.125])  # within UNIT_RANGE
    with pytest.raises(ValueError, match="sensitivity"):
        units(np.ones(2), np.array([1.0, 0.0]))


def test_context_pays_on_correlated_latents():
    """Smooth planes, the second channel following the first: prediction takes most of the bits away."""
    rng = np.random.default_rng(7)

    def smooth():
        base = np.cumsum(np.cumsum(rng.normal(size=(40, 56)), 0), 1) / 20
        return np.stack([base, base * 0.8 + rng.normal(size=base.shape) * 0.1, -base, rng.normal(size=base.shape)])

    train = [smooth().astype(np.float32) for i in range(6)]
    context = train_model(train, EntropyModelConfig("t", 1.0, 0.0, 4))
    flat = train_model(train, EntropyModelConfig("t", 1.0, 0.0, 4, context=False))
    assert not flat.weights.any() and context.weights.any()
    test = smooth().astype(np.float32)
    with_context, without = (len(EntropyCoder(m, 0.25).encode(test)) for m in (context, flat))
    assert with_context < 0.7 * without
    coder = EntropyCoder(context, 0.25)
    np.testing.assert_array_equal(decode_symbols(coder.encode(test), context, test.shape)[0], coder.quantize(test))


def test_coarser_steps_cost_fewer_bits(model):
    latents = _latents(101, 48, 64)
    sizes = [len(EntropyCoder(model, step).encode(latents)) for step in (0.125, 0.5, 2.0)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[1] * 8 / latents.size < 8  # fewer bits than q8 per value


def test_entropy_format_without_a_model_is_refused():
    with pytest.raises(ValueError, match="needs its entropy model"):
        store(_latents(0), get_format("entropy"))


@pytest.mark.parametrize("damage", ["truncated", "one_word_short", "runs_on", "header", "flipped_word", "magic"])
def test_damaged_streams_are_refused(model, damage):
    latents = _latents(102)
    stream = bytearray(EntropyCoder(model, 0.5).encode(latents))
    if damage == "truncated":
        stream = stream[:HEADER.size - 3]
    elif damage == "one_word_short":
        stream = stream[:-4]
    elif damage == "runs_on":
        stream += b"\0\0\0\0"
    elif damage == "header":
        stream[24:28] = (7).to_bytes(4, "little")  # width 7: another shape
    elif damage == "flipped_word":
        stream[len(stream) // 2] ^= 0x5A
    else:
        stream[:4] = b"XXXX"
    with pytest.raises(EntropyStreamError):
        decode_symbols(bytes(stream), model, latents.shape)


def test_a_stream_of_another_model_is_refused(model):
    other = train_model([_latents(seed) * 2 for seed in range(3)], EntropyModelConfig("test-vae", 0.5, 0.1, 4))
    stream = EntropyCoder(model, 0.5).encode(_latents(103))
    with pytest.raises(EntropyStreamError, match="written by entropy model"):
        decode_symbols(stream, other, (4, 24, 32))


def test_another_process_decodes_the_same_symbols_bit_for_bit(model, tmp_path):
    """The decoder rebuilds its tables from the saved model alone, in a fresh interpreter."""
    model.save(tmp_path / "entropy")
    latents = _latents(104, 40, 56)
    coder = EntropyCoder(model, 0.375)
    (tmp_path / "stream.bin").write_bytes(coder.encode(latents))
    script = textwrap.dedent(f"""
        import numpy as np
        from latentd.archive.entropy_coder import EntropyCoder, decode_symbols
        from latentd.archive.entropy_model import load_entropy_model
        model = load_entropy_model({str(tmp_path / 'entropy')!r})
        stream = open({str(tmp_path / 'stream.bin')!r}, "rb").read()
        symbols, bins = decode_symbols(stream, model, (4, 40, 56))
        np.save({str(tmp_path / 'symbols.npy')!r}, symbols)
        np.save({str(tmp_path / 'latents.npy')!r}, EntropyCoder(model, 0.375).decode(stream, (4, 40, 56)))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "symbols.npy"), coder.quantize(latents))
    here = coder.decode((tmp_path / "stream.bin").read_bytes(), latents.shape)
    assert np.load(tmp_path / "latents.npy").tobytes() == here.tobytes()


def test_the_bitstream_of_fixed_tables_is_pinned():
    """Integer tables in, the same bytes out on every machine and constriction version we accept: a change
    of the coder's fixed-point quantisation would make old archives undecodable, and fails here first."""
    counts = np.zeros((6, 2 * 32 * 64 + 1), np.int64)  # two channels of three phases
    counts[:, 32 * 64 - 128:32 * 64 + 129] = np.arange(257)[::-1] % 50 + 1
    weights = np.zeros((6, 6), np.int64)
    weights[1, :4] = weights[2, :4] = 1024  # B and C: the mean of four neighbours
    weights[5, 4] = 2048  # channel 1, phase C: half channel 0's value besides
    from latentd.archive.entropy_model import EntropyModel

    model = EntropyModel(EntropyModelConfig("pinned", 1.0, 0.0, 2), np.zeros(2), np.ones(2), np.ones(2), weights,
                         counts, np.array([3, 0, 0, 0, 0, 0]))
    symbols = (np.arange(2 * 8 * 8).reshape(2, 8, 8) * 7919 % 11 - 5).astype(np.int32)
    symbols[1, 7, 7] = 1000  # an escape
    from latentd.archive.entropy_coder import encode_symbols

    stream = encode_symbols(symbols, model, 16)
    np.testing.assert_array_equal(decode_symbols(stream, model, (2, 8, 8))[0], symbols)
    assert hashlib.sha256(stream).hexdigest() == PINNED


PINNED = "1ce49a409e4ed64e67600c126ee0e1ecae7b9fd5b95ded8df5e359ba1fc236b3"  # constriction 0.4.1 and 0.5.0
