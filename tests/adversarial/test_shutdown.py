"""SIGTERM with long work running: `latentd serve` stops it at its next chunk, exiting in grace_s plus one chunk."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from latentd.bench.server_process import ServerProcess
from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.adversarial.test_cost_limits import blank_png

GRACE_S = 2
# Long work within the limits this server is given: minutes of tiles for the tiny model, each a chunk.
LONG_WORK = {
    "SamplePrior": pb.SamplePriorRequest(count=1, height=1, width=16777216),  # the wide compute lane
    "Encode": pb.EncodeRequest(images=[pb.Image(encoded=blank_png(4096, 4096))] * 4,  # batches of tiles
                               options=pb.EncodeOptions(tiling=pb.TILING_ON)),
}


@pytest.mark.slow
@pytest.mark.parametrize("rpc, overlap", [(rpc, "auto") for rpc in sorted(LONG_WORK)] + [("Encode", "on")])
def test_sigterm_exits_within_grace_while_long_work_runs(model_dirs, rpc, overlap):
    """overlap on: the batcher's two pipelined workers (a GPU's default) stop as cleanly."""
    extra = ("--grace-s", str(GRACE_S), "--max-request-pixels", str(10**12), "--max-message-mb", "1024",
             "--overlap", overlap)
    with ServerProcess.latentd("tiny", model_dirs["tiny"], 8, extra) as server:
        with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(1) as pool:
            call = pool.submit(getattr(pb_grpc.LatentdStub(channel), rpc), LONG_WORK[rpc], timeout=600)
            deadline = time.monotonic() + 60
            while not server.metric("latentd_memory_held_bytes"):  # admitted: its work has started
                assert time.monotonic() < deadline and not call.done(), "the long request never started"
                time.sleep(0.02)
            time.sleep(0.5)  # well into its tiles
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            # Bounded: grace_s plus one tile, with room for a loaded machine; without chunks it takes minutes.
            assert server.process.wait(GRACE_S + 60) == 0
            exited = time.monotonic() - signalled
            with pytest.raises(grpc.RpcError) as raised:
                call.result(30)
            assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    log = "".join(server.log)
    assert "stopped" in log and "Traceback" not in log, log[-3000:]
    print(f"{rpc}: SIGTERM to exit {exited:.2f} s with --grace-s {GRACE_S}")
