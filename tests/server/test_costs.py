"""Request costs from headers and numbers alone, and the limits they are checked against, each naming its field."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentd.server import costs
from latentd.server.costs import Cost, ResponseTooLargeError
from latentd.server.settings import ServerSettings
from latentd.server.wire import OutputFormat
from latentd.v1 import latentd_pb2 as pb
from latentd.vae import Codec, CodecOptions
from latentd.vae.options import RECOMPUTED_TILE_WORK
from latentd.vae.errors import ImageTooLargeError, InvalidInputError
from latentd.vae.tiling import tile_spans
from tests.conftest import make_tiny_kl

SETTINGS = ServerSettings(models={"tiny": "x"})


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_untiled_image_costs_its_padded_size_and_at_least_one_call(tiny_codec):
    assert tiny_codec.factor == 2
    assert tiny_codec.model_calls(33, 17, decode=False) == {34 * 18: 1}
    assert costs.model_pixels(tiny_codec, 100, 101, decode=False, tiling="auto") == 100 * 102
    assert costs.model_pixels(tiny_codec, 8, 8, decode=True, tiling="auto") == costs.MIN_CALL_PIXELS


def test_a_tiled_image_costs_every_tile_with_its_overlap(tiny_codec):
    f, tile, overlap = 2, 512 // 2, 128 // 2
    calls = tiny_codec.model_calls(2048, 3000, decode=True)
    rows, cols = tile_spans(1024, tile, overlap), tile_spans(1500, tile, overlap)
    assert sum(calls.values()) == len(rows) * len(cols)
    assert sum(p * n for p, n in calls.items()) == sum(e - s for s, e in rows) * sum(e - s for s, e in cols) * f * f
    assert tiny_codec.model_calls(2048, 3000, decode=True, tiling="off") == {2048 * 3000: 1}


def test_recomputed_tiles_cost_their_measured_work():
    plain = Codec(make_tiny_kl(), options=CodecOptions(tile_norms="image"))
    recomputed = Codec(make_tiny_kl(), options=CodecOptions(tile_norms="image-recompute"))
    calls = plain.model_calls(2048, 3000, decode=True)
    assert recomputed.model_calls(2048, 3000, decode=True) == {p: n * RECOMPUTED_TILE_WORK for p, n in calls.items()}
    assert recomputed.model_calls(64, 64, decode=True) == plain.model_calls(64, 64, decode=True)  # untiled: one pass


def test_shared_tile_norms_hold_every_tiles_activations_in_the_memory_budget():
    from latentd.vae.pass_limits import activation_bytes_per_pixel

    tiled = {mode: Codec(make_tiny_kl(), options=CodecOptions(tile_norms=mode))
             for mode in ("tile", "image", "image-recompute")}
    per_pixel = activation_bytes_per_pixel(tiled["image"].model, tiled["image"].placement.dtype)
    for decode in (False, True):
        tile_pixels = costs.model_pixels(tiled["tile"], 2048, 3000, decode=decode, tiling="auto")
        held = costs.shared_norm_bytes(tiled["image"], 2048, 3000, decode=decode, tiling="auto")
        assert held == tile_pixels * per_pixel > 2048 * 3000 * per_pixel  # the overlaps too
        assert costs.shared_norm_bytes(tiled["image"], 2048, 3000, decode=decode, tiling="off") == 0
        assert costs.shared_norm_bytes(tiled["image"], 512, 512, decode=decode, tiling="auto") == 0  # untiled
        for mode in ("tile", "image-recompute"):  # one tile's activations, bounded by the pass limits
            assert costs.shared_norm_bytes(tiled[mode], 2048, 3000, decode=decode, tiling="auto") == 0
    request = pb.EncodeRequest(images=[pb.Image(encoded=png(3000, 2048))])
    latents = pb.DecodeRequest(items=[pb.Latents(latents=pb.Tensor(dtype=pb.FLOAT32, shape=[4, 1024, 1500]))])
    costed = {mode: (costs.encode_cost(request, codec, SETTINGS, "auto", "float32").held_bytes,
                     costs.decode_cost(latents, codec, SETTINGS, "auto", OutputFormat.parse(0, 0)).held_bytes)
              for mode, codec in tiled.items() if mode != "image"}
    assert costed["tile"] == costed["image-recompute"]
    small = ServerSettings(models={"tiny": "x"}, memory_budget_mb=2048)
    with pytest.raises(InvalidInputError, match="memory_budget_mb 2048") as raised:
        costs.encode_cost(request, tiled["image"], small, "auto", "float32")
    assert raised.value.field == "images"
    with pytest.raises(InvalidInputError, match="memory_budget_mb 2048") as raised:
        costs.decode_cost(latents, tiled["image"], small, "auto", OutputFormat.parse(0, 0))
    assert raised.value.field == "items"
    roomy = ServerSettings(models={"tiny": "x"}, memory_budget_mb=64 * 1024)
    image_held = costs.encode_cost(request, tiled["image"], roomy, "auto", "float32").held_bytes
    assert image_held - costed["tile"][0] == costs.shared_norm_bytes(tiled["image"], 2048, 3000, decode=False,
                                                                     tiling="auto")


def test_a_sliver_costs_its_thousands_of_calls(tiny_codec):
    request = pb.SamplePriorRequest(count=1, height=1, width=16777216)
    with pytest.raises(InvalidInputError, match="max_request_pixels") as raised:
        costs.sample_prior_cost(request, tiny_codec, SETTINGS, OutputFormat.parse(0, 0))
    assert raised.value.field == "width"


def test_an_answer_over_the_message_limit_is_out_of_range(tiny_codec):
    request = pb.SamplePriorRequest(count=64, height=1024, width=1024)
    with pytest.raises(ResponseTooLargeError, match="max_message_mb 64") as raised:
        costs.sample_prior_cost(request, tiny_codec, SETTINGS, OutputFormat.parse(0, 0))
    assert raised.value.field == "count"
    small = pb.SamplePriorRequest(count=2, height=64, width=64)
    cost = costs.sample_prior_cost(small, tiny_codec, SETTINGS, OutputFormat.parse(pb.RAW_FLOAT, 0))
    assert cost.response_bytes == 2 * (64 * 64 * 12 + costs.ITEM_OVERHEAD)


def test_encode_reads_sizes_from_headers_and_refuses_eighty_4096_pngs(tiny_codec):
    data = png(4096, 4096)
    request = pb.EncodeRequest(images=[pb.Image(encoded=data)] * 80)
    with pytest.raises(InvalidInputError, match="max_request_pixels") as raised:
        costs.encode_cost(request, tiny_codec, SETTINGS, "auto", "float32")
    assert raised.value.field == "images" and "80 images" in str(raised.value)


def test_an_image_over_max_pixels_is_refused_from_its_header(tiny_codec):
    request = pb.EncodeRequest(images=[pb.Image(encoded=png(16, 16)), pb.Image(encoded=png(5000, 4000))])
    with pytest.raises(ImageTooLargeError) as raised:
        costs.encode_cost(request, tiny_codec, SETTINGS, "auto", "float32")
    assert raised.value.field == "images[1].encoded" and "exceeds the limit" in str(raised.value)


def test_raw_pixels_are_sized_from_their_shape(tiny_codec):
    huge = pb.Image(pixels=pb.Tensor(dtype=pb.UINT8, shape=[2**20, 2**20, 3]))
    with pytest.raises(ImageTooLargeError) as raised:
        costs.encode_cost(pb.EncodeRequest(images=[huge]), tiny_codec, SETTINGS, "auto", "float32")
    assert raised.value.field == "images[0].pixels"
    # A shape no array can have is refused as such, as wire.read_image would, before it is costed.
    impossible = pb.Image(pixels=pb.Tensor(dtype=pb.UINT8, shape=[2**31, 2**31, 3]))
    with pytest.raises(InvalidInputError, match="larger than any array") as raised:
        costs.encode_cost(pb.EncodeRequest(images=[impossible]), tiny_codec, SETTINGS, "auto", "float32")
    assert raised.value.field == "images[0].pixels.shape"
    pixels = pb.Image(pixels=pb.Tensor(dtype=pb.FLOAT32, shape=[3, 40, 50], data=bytes(3 * 40 * 50 * 4)))
    assert costs.image_size(pixels, "image_a", SETTINGS.max_pixels) == (40, 50, 2 * costs.FLOAT_PIXEL)
    malformed = pb.Image(pixels=pb.Tensor(dtype=pb.UINT8, shape=[5]))
    assert costs.image_size(malformed, "image_a", SETTINGS.max_pixels) == (0, 0, 0)  # wire.read_image names it


def test_more_items_than_the_queue_holds_is_invalid(tiny_codec):
    settings = ServerSettings(models={"tiny": "x"}, queue_limit=4)
    request = pb.EncodeRequest(images=[pb.Image(encoded=png(8, 8))] * 5)
    with pytest.raises(InvalidInputError, match="queue_limit 4") as raised:
        costs.encode_cost(request, tiny_codec, settings, "auto", "float32")
    assert raised.value.field == "images"


def test_decode_answer_size_follows_the_format(tiny_codec):
    latents = np.zeros((4, 512, 512), np.float32)
    item = pb.Latents(latents=pb.Tensor(dtype=pb.FLOAT32, shape=list(latents.shape), data=latents.tobytes()))
    request = pb.DecodeRequest(items=[item] * 8)
    uint8 = costs.decode_cost(request, tiny_codec, SETTINGS, "auto", OutputFormat.parse(pb.RAW_UINT8, 0))
    assert uint8.response_bytes == 8 * (1024 * 1024 * 3 + costs.ITEM_OVERHEAD)
    with pytest.raises(ResponseTooLargeError) as raised:
        costs.decode_cost(request, tiny_codec, SETTINGS, "auto", OutputFormat.parse(pb.RAW_FLOAT, 0))
    assert raised.value.field == "items"


def test_a_request_larger_than_the_memory_budget_is_invalid(tiny_codec):
    settings = ServerSettings(models={"tiny": "x"}, memory_budget_mb=16)
    request = pb.EncodeRequest(images=[pb.Image(encoded=png(1024, 1024))])
    with pytest.raises(InvalidInputError, match="memory_budget_mb 16") as raised:
        costs.encode_cost(request, tiny_codec, settings, "auto", "float32")
    assert raised.value.field == "images"
    cost = costs.encode_cost(request, tiny_codec, SETTINGS, "auto", "float32")
    # Decoded uint8 and float pixels at least; the request's own bytes too.
    assert cost.held_bytes > 1024 * 1024 * (costs.UINT8_PIXEL + costs.FLOAT_PIXEL) + request.ByteSize()


def test_webp_sides_are_checked_before_work(tiny_codec):
    request = pb.SamplePriorRequest(count=1, height=2, width=20000)
    with pytest.raises(InvalidInputError, match="WEBP holds images up to 16383") as raised:
        costs.sample_prior_cost(request, tiny_codec, SETTINGS, OutputFormat.parse(pb.WEBP, 0))
    assert raised.value.field == "count"


def test_interpolation_costs_its_steps(tiny_codec):
    request = pb.InterpolateRequest(image_a=pb.Image(encoded=png(1024, 1024)),
                                    image_b=pb.Image(encoded=png(1024, 1024)))
    eight = costs.interpolate_cost(request, tiny_codec, SETTINGS, 8, OutputFormat.parse(0, 0))
    assert eight.model_pixels == 10 * 1024 * 1024  # two encodes, eight decodes
    with pytest.raises(InvalidInputError, match="max_request_pixels") as raised:
        costs.interpolate_cost(request, tiny_codec, SETTINGS, 64, OutputFormat.parse(0, 0))
    assert raised.value.field == "steps"


def test_costs_add_and_scale():
    assert Cost(1, 2, 3) + Cost(10, 20, 30) == Cost(11, 22, 33)
    assert Cost(1, 2, 3) * 4 == Cost(4, 8, 12)


def test_an_answer_larger_than_its_estimate_is_still_out_of_range_not_a_send_failure():
    from latentd.server.metrics import ServerMetrics
    from latentd.server.servicer import LatentdServicer

    servicer = LatentdServicer(None, ServerSettings(models={"tiny": "x"}, max_message_mb=1), ServerMetrics())
    small = pb.ImagesResponse(images=[pb.Image(encoded=bytes(1000))])
    assert servicer._fits(small, "count") is small
    with pytest.raises(ResponseTooLargeError, match="max_message_mb 1") as raised:
        servicer._fits(pb.ImagesResponse(images=[pb.Image(encoded=bytes(2 * costs.MIB))]), "count")
    assert raised.value.field == "count"


def _encode_request(steps: int, side: int = 64, tiling: int = pb.TILING_AUTO) -> pb.EncodeRequest:
    return pb.EncodeRequest(images=[pb.Image(encoded=png(side, side))],
                            options=pb.EncodeOptions(refine_steps=steps, tiling=tiling))


def test_refinement_costs_three_decodes_a_step_and_the_decoders_activations(tiny_codec):
    settings = SETTINGS
    plain = costs.encode_cost(_encode_request(0), tiny_codec, settings, "auto", "float32")
    refined = costs.encode_cost(_encode_request(5), tiny_codec, settings, "auto", "float32")
    decode = costs.model_pixels(tiny_codec, 64, 64, decode=True, tiling="off")
    assert refined.model_pixels - plain.model_pixels == 5 * costs.REFINE_MODEL_CALLS * decode
    field = _encode_request(5).ByteSize() - _encode_request(0).ByteSize()  # the request holds its own bytes
    assert refined.held_bytes - plain.held_bytes - field == 64 * 64 * costs.refine_bytes_per_pixel(tiny_codec)
    with pytest.raises(InvalidInputError, match=r"options.refine_steps: .*untiled images only; images\[0\]") as raised:
        costs.encode_cost(_encode_request(5, tiling=pb.TILING_ON), tiny_codec, settings, "on", "float32")
    assert raised.value.field == "options.refine_steps"
    with pytest.raises(InvalidInputError, match="max_request_pixels"):  # refinement's work counts against the limit
        costs.encode_cost(_encode_request(200, side=512), tiny_codec, settings, "auto", "float32")


def test_refinement_memory_follows_the_decoders_layout(tiny_codec):
    from latentd.vae import load_codec

    default = load_codec("default", device="cpu")
    # the measured peak growth of a refinement step on the default model: 3.7-4.0 KB per pixel
    assert 3700 <= costs.refine_bytes_per_pixel(default) <= 5000
    assert costs.refine_bytes_per_pixel(tiny_codec) < costs.refine_bytes_per_pixel(default)
    unknown = type("Unknown", (), {"model": object()})()
    assert costs.refine_bytes_per_pixel(unknown) == costs.REFINE_ACTIVATION_BYTES * costs.REFINE_UNKNOWN_UNITS
