"""One error tree and one output vocabulary for the in-process codec and the SDK."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from latentd.client.errors import error_for
from latentd.v1 import errors as shared
from latentd.v1.outputs import OUTPUT_KINDS, normalise
from latentd.vae import errors as library
from tests.conftest import smooth_image


@pytest.mark.parametrize("code, base", [(grpc.StatusCode.INVALID_ARGUMENT, library.InvalidInputError),
                                        (grpc.StatusCode.NOT_FOUND, shared.NotFoundError),
                                        (grpc.StatusCode.UNAVAILABLE, library.LatentdError)])
def test_a_remote_error_is_caught_where_the_local_one_is(code, base):
    remote = error_for(code, "images[0]: not an image")
    assert isinstance(remote, base) and isinstance(remote, shared.LatentdError)
    assert library.InvalidInputError is shared.InvalidInputError  # the library raises the shared classes
    assert issubclass(library.ModelNotFoundError, shared.NotFoundError)


def test_one_except_serves_a_local_codec_and_a_server(tiny_codec):
    caught = []
    for failing in (lambda: tiny_codec.encode(np.zeros((4, 4, 7), np.uint8)),
                    lambda: (_ for _ in ()).throw(error_for(grpc.StatusCode.INVALID_ARGUMENT, "images[0]: bad"))):
        try:
            failing()
        except shared.InvalidInputError as exc:
            caught.append(type(exc).__module__)
    assert caught == ["latentd.v1.errors", "latentd.client.errors"]


def test_the_output_vocabulary_is_shared_and_the_old_name_still_works(tiny_codec):
    assert OUTPUT_KINDS == ("numpy", "pil", "tensor") and normalise("torch") == "tensor"
    latents = tiny_codec.encode(smooth_image(16, 16))
    assert tiny_codec.decode(latents, output="torch").shape == tiny_codec.decode(latents, output="tensor").shape
    with pytest.raises(library.InvalidInputError) as caught:
        tiny_codec.decode(latents, output="jpeg")
    assert caught.value.field == "output"
