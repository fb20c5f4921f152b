"""The CLI against a server: `--server` gives the in-process results; `models` and `health` answer."""

from __future__ import annotations

import json
import socket

import pytest
from PIL import Image

from latentd.client.cli import main
from tests.conftest import smooth_image


@pytest.mark.parametrize("refine", [[], ["--refine", "3"]])
def test_roundtrip_on_a_server_matches_in_process(start_server, model_dirs, tmp_path, capsys, refine):
    harness = start_server(max_batch_size=1)
    paths = []
    for index in range(2):
        paths.append(tmp_path / f"img{index}.png")
        Image.fromarray(smooth_image(40, 48, seed=index)).save(paths[-1])
    reports = {}
    for name, extra in (("local", ["--model", model_dirs["tiny"]]), ("remote", ["--server", harness.address])):
        assert main(["roundtrip", *map(str, paths), "-o", str(tmp_path / name), "--json", *extra, *refine]) == 0
        reports[name] = json.loads(capsys.readouterr().out)
    assert reports["remote"]["summary"]["device"] == f"server {harness.address}"
    for local, remote in zip(reports["local"]["images"], reports["remote"]["images"]):
        assert remote["bpp"] == local["bpp"]
        if refine:  # Adam's steps amplify the float rounding of the server's thread count
            assert remote["psnr"] == pytest.approx(local["psnr"], abs=1e-3)
        else:
            assert remote["psnr"] == local["psnr"]
    if not refine:
        assert (tmp_path / "remote" / "img0.png").read_bytes() == (tmp_path / "local" / "img0.png").read_bytes()


def test_models_and_health(start_server, capsys):
    harness = start_server()
    assert main(["models", "--server", harness.address, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["tiny", "fast"] and listed[0]["latent_channels"] == 4
    assert main(["models", "--server", harness.address]) == 0
    assert "AutoencoderTiny" in capsys.readouterr().out
    assert main(["health", "--server", harness.address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_health_of_nothing_fails_in_one_line(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["health", "--server", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentd health: error: UNAVAILABLE") and "\n" not in err
