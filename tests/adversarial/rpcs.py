"""Every RPC a latentd server answers, with a small valid request each, and raw-bytes calls to them."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from PIL import Image

from latentd.v1.tensors import to_tensor
from latentd.v1 import latentd_pb2 as pb
from tests.conftest import smooth_image


def png(height: int = 16, width: int = 16, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(height, width, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def latents(fill: float = 0.1, shape=(4, 8, 8)) -> pb.Tensor:
    return to_tensor(np.full(shape, fill, np.float32))


@dataclass(frozen=True)
class Rpc:
    method: str  # the full path, /package.Service/Method
    request_streaming: bool
    response_streaming: bool
    request_type: type[Message]
    response_type: type[Message]
    valid: Callable[[], Message]

    @property
    def name(self) -> str:
        return self.method.rsplit("/", 1)[1] if "Latentd" in self.method else self.method.split("/")[1]

    def call(self, channel: grpc.Channel, requests: list[Any], *, raw: bool = False, timeout: float = 30,
             metadata=()) -> list[Message]:
        """Send `requests` (messages, or bytes with `raw`) and return every response."""
        serialize = None if raw else self.request_type.SerializeToString
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}
        stub = kind[(self.request_streaming, self.response_streaming)](
            self.method, request_serializer=serialize, response_deserializer=self.response_type.FromString)
        argument = iter(requests) if self.request_streaming else requests[0]
        answer = stub(argument, timeout=timeout, metadata=metadata)
        return list(answer) if self.response_streaming else [answer]


def _latentd(name: str, streaming: bool, request_type, response_type, valid) -> Rpc:
    return Rpc(f"/latentd.v1.Latentd/{name}", streaming, streaming, request_type, response_type, valid)


ENCODE = _latentd("Encode", False, pb.EncodeRequest, pb.EncodeResponse,
                  lambda: pb.EncodeRequest(images=[pb.Image(encoded=png())]))
DECODE = _latentd("Decode", False, pb.DecodeRequest, pb.DecodeResponse,
                  lambda: pb.DecodeRequest(items=[pb.Latents(latents=latents())], options=pb.DecodeOptions(
                      format=pb.RAW_UINT8)))
ENCODE_STREAM = _latentd("EncodeStream", True, pb.EncodeRequest, pb.EncodeResponse,
                         lambda: pb.EncodeRequest(id="1", images=[pb.Image(encoded=png())]))
DECODE_STREAM = _latentd("DecodeStream", True, pb.DecodeRequest, pb.DecodeResponse,
                         lambda: pb.DecodeRequest(id="1", items=[pb.Latents(latents=latents())]))
LIST_MODELS = _latentd("ListModels", False, pb.ListModelsRequest, pb.ListModelsResponse, pb.ListModelsRequest)
GET_MODEL = _latentd("GetModel", False, pb.GetModelRequest, pb.ModelInfo, pb.GetModelRequest)
INTERPOLATE = _latentd("Interpolate", False, pb.InterpolateRequest, pb.ImagesResponse,
                       lambda: pb.InterpolateRequest(image_a=pb.Image(encoded=png(seed=1)),
                                                     image_b=pb.Image(encoded=png(seed=2)), steps=2,
                                                     format=pb.RAW_UINT8))
SAMPLE_PRIOR = _latentd("SamplePrior", False, pb.SamplePriorRequest, pb.ImagesResponse,
                        lambda: pb.SamplePriorRequest(count=1, height=16, width=16, format=pb.RAW_UINT8))
ANOMALY_SCORE = _latentd("AnomalyScore", False, pb.AnomalyScoreRequest, pb.AnomalyScoreResponse,
                         lambda: pb.AnomalyScoreRequest(images=[pb.Image(encoded=png())]))
HEALTH_CHECK = Rpc("/grpc.health.v1.Health/Check", False, False, health_pb2.HealthCheckRequest,
                   health_pb2.HealthCheckResponse, health_pb2.HealthCheckRequest)
REFLECTION = [Rpc(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo", True, True,
                  reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse,
                  lambda: reflection_pb2.ServerReflectionRequest(list_services=""))
              for version in ("v1", "v1alpha")]

LATENTD = [ENCODE, DECODE, ENCODE_STREAM, DECODE_STREAM, LIST_MODELS, GET_MODEL, INTERPOLATE, SAMPLE_PRIOR,
           ANOMALY_SCORE]
EVERY = [*LATENTD, HEALTH_CHECK, *REFLECTION]  # Health/Watch never ends: tested on its own


def serving(channel: grpc.Channel) -> str:
    """The server's overall health status name."""
    status = HEALTH_CHECK.call(channel, [health_pb2.HealthCheckRequest()], timeout=10)[0].status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def assert_healthy(channel: grpc.Channel, metadata=()) -> None:
    """SERVING, and a normal request is answered."""
    assert serving(channel) == "SERVING"
    response = ENCODE.call(channel, [ENCODE.valid()], timeout=30, metadata=metadata)[0]
    assert len(response.items) == 1 and not response.error.code
