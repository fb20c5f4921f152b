"""A bare grpc.aio server that answers Encode and Decode at once with zeros of the real shapes: the floor of
gRPC's own cost per request, which `latentd bench serve` measures beside the real server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

from latentd.v1.tensors import to_tensor
from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from latentd.vae.model_info import latent_shape

logger = logging.getLogger("latentd.server.floor")


class FloorServicer(pb_grpc.LatentdServicer):
    """Encode: float32 zeros [channels, ceil(H / f), ceil(W / f)] per raw uint8 image; Decode: uint8 zeros
    [h * f, w * f, 3] per latent: the messages the real server sends for the bench's requests, without a model."""

    def __init__(self, factor: int, channels: int) -> None:
        self.factor, self.channels = factor, channels

    async def Encode(self, request, context):
        items = []
        for image in request.images:
            height, width = image.pixels.shape[0], image.pixels.shape[1]
            latents = np.zeros(latent_shape(self.channels, self.factor, height, width), np.float32)
            items.append(pb.EncodedImage(latents=to_tensor(latents), height=height, width=width))
        return pb.EncodeResponse(id=request.id, model=request.model, items=items)

    async def Decode(self, request, context):
        images = []
        for item in request.items:
            _, height, width = item.latents.shape
            images.append(pb.Image(pixels=to_tensor(np.zeros((height * self.factor, width * self.factor, 3),
                                                             np.uint8))))
        return pb.DecodeResponse(id=request.id, model=request.model, images=images)


async def serve(factor: int, channels: int) -> None:
    """Serve on a free loopback port with Prometheus process metrics until SIGTERM; the log lines are
    those of `latentd serve` that ServerProcess reads."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    http, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
    pb_grpc.add_LatentdServicer_to_server(FloorServicer(factor, channels), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    logger.info("listening on 127.0.0.1:%d, metrics on :%d", port, http.server_port)
    logger.info("serving the floor (no model)")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)
    http.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentd.bench.floor_server", description=__doc__)
    parser.add_argument("--factor", type=int, required=True, help="the model's downsampling factor")
    parser.add_argument("--channels", type=int, required=True, help="the model's latent channels")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.factor, args.channels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
