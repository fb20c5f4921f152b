"""The wire's request checks: each refusal names the field at fault."""

from __future__ import annotations

import re

import pytest

from latentd.server import wire
from latentd.v1 import latentd_pb2 as pb
from latentd.vae.errors import InvalidInputError


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"count": 0, "height": 8, "width": 8}, "count"),
    ({"count": wire.MAX_PRIOR_SAMPLES + 1, "height": 8, "width": 8}, "count"),
    ({"count": 1, "height": 0, "width": 8}, "height"),
    ({"count": 1, "height": 8, "width": -1}, "width"),
    ({"count": 1, "height": 4096, "width": 4096}, "height"),
])
def test_prior_sample_refuses_counts_and_sizes_out_of_range(request_fields, field):
    with pytest.raises(InvalidInputError) as raised:
        wire.prior_sample(pb.SamplePriorRequest(**request_fields), max_pixels=1024 * 1024)
    assert raised.value.field == field


def test_prior_sample_accepts_the_limits():
    wire.prior_sample(pb.SamplePriorRequest(count=wire.MAX_PRIOR_SAMPLES, height=1024, width=1024), 1024 * 1024)


def test_nonempty_names_the_empty_field():
    wire.nonempty([pb.Image()], "images")
    with pytest.raises(InvalidInputError) as raised:
        wire.nonempty([], "items")
    assert raised.value.field == "items" and "items is empty" in str(raised.value)


@pytest.mark.parametrize("options, message", [
    (pb.EncodeOptions(refine_steps=201), "options.refine_steps must be 0-200, got 201"),
    (pb.EncodeOptions(refine_steps=2**32 - 1), "options.refine_steps must be 0-200"),
    (pb.EncodeOptions(refine_steps=3, sample=True), "options.refine_steps: refinement improves the posterior mean"),
])
def test_refine_steps_out_of_range_or_with_sample_are_refused_naming_the_field(options, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)) as raised:
        wire.refine_steps(options)
    assert raised.value.field == "options.refine_steps"
    assert wire.refine_steps(pb.EncodeOptions(refine_steps=200)) == 200
