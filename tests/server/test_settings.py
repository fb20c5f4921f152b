"""Server settings: one typed object, file < environment < flags, bad values named."""

from __future__ import annotations

import pytest

from latentd.client.cli import build_parser
from latentd.client.cli.serve import settings_from_args
from latentd.server.jobs import DECODE, ENCODE, BatchKey
from latentd.server.models import CPU_BATCH_PIXELS, batch_pixel_limit, items_per_call
from latentd.server.settings import ServerSettings, load_settings, parse_models
from latentd.vae.errors import InvalidInputError


def test_defaults_are_safe():
    settings = load_settings(environ={})
    assert settings.host == "127.0.0.1" and settings.port == 50051
    assert settings.models == {"default": "default"} and settings.default_model == "default"
    assert settings.auth_tokens == () and settings.metrics_port is None


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[server]\nport = 6000\nmax_batch_size = 4\nqueue_limit = 9\nmodels = {a = "sd"}\n')
    environ = {"LATENTD_MAX_BATCH_SIZE": "16", "LATENTD_WARMUP": "false", "LATENTD_AUTH_TOKENS": "tok-1, tok-2",
               "LATENTD_UNRELATED": "ignored"}
    settings = load_settings({"port": 7000, "queue_limit": None}, environ=environ, file=path)
    assert settings.port == 7000  # flag
    assert settings.max_batch_size == 16 and settings.warmup is False  # environment over file
    assert settings.queue_limit == 9 and settings.models == {"a": "sd"}  # file; a None flag is "not given"
    assert settings.auth_tokens == ("tok-1", "tok-2") and "tok-" not in str(settings.redacted())


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "s.yaml").write_text("max_batch_delay_ms: 2.5\nmodels: [fast=taesd, sd]\n")
    (tmp_path / "s.json").write_text('{"grace_s": 3}')
    assert load_settings(environ={}, file=tmp_path / "s.yaml").models == {"fast": "taesd", "sd": "sd"}
    assert load_settings(environ={}, file=tmp_path / "s.json").grace_s == 3.0


@pytest.mark.parametrize("values, field", [
    ({"port": 70000}, "port"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_pixels": -1}, "max_batch_pixels"),
    ({"cpu_compute_lanes": 0}, "cpu_compute_lanes"),
    ({"busy_batch_delay_ms": -1}, "busy_batch_delay_ms"),
    ({"bulk_max_batch_size": 0}, "bulk_max_batch_size"),
    ({"max_request_pixels": 1000}, "max_request_pixels"),
    ({"memory_budget_mb": 0}, "memory_budget_mb"),
    ({"admission_wait_ms": -1}, "admission_wait_ms"),
    ({"max_concurrent_rpcs": 0}, "max_concurrent_rpcs"),
    ({"queue_limit": "many"}, "queue_limit"),
    ({"warmup": "perhaps"}, "warmup"),
    ({"tls_cert": "c.pem"}, "tls_key"),
    ({"tls_client_ca": "ca.pem"}, "tls_client_ca"),
    ({"models": ["=x"]}, "models"),
    ({"no_such_setting": 1}, "no_such_setting"),
    ({"http_port": 70000}, "http_port"),
    ({"http_port": "web"}, "http_port"),
])
def test_bad_values_name_the_setting(values, field):
    with pytest.raises(InvalidInputError) as raised:
        load_settings(values, environ={})
    assert raised.value.field == field and field in str(raised.value)


def test_bad_files(tmp_path):
    with pytest.raises(InvalidInputError, match="settings file"):
        load_settings(environ={}, file=tmp_path / "missing.toml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="expected a table"):
        load_settings(environ={}, file=tmp_path / "list.json")


def test_model_items():
    assert parse_models(["a=sd", "/x/my-vae"]) == {"a": "sd", "my-vae": "/x/my-vae"}
    assert parse_models("a=sd,b=taesd") == {"a": "sd", "b": "taesd"}
    assert ServerSettings(models={"b": "taesd", "a": "sd"}).default_model == "b"


def test_cli_flags_and_token_file(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nalpha\n\nbeta\n")
    args = build_parser().parse_args(["serve", "--port", "0", "--model", "x=taesd", "--model", "y=sd",
                                      "--auth-tokens-file", str(tokens), "--no-warmup", "--cpu-compute-lanes", "1"])
    settings = settings_from_args(args, environ={})
    assert settings.port == 0 and settings.models == {"x": "taesd", "y": "sd"} and settings.cpu_compute_lanes == 1
    assert settings.auth_tokens == ("alpha", "beta") and settings.warmup is False


def test_http_port_from_flag_environment_and_file(tmp_path):
    assert load_settings(environ={}).http_port is None  # no HTTP endpoint unless asked
    args = build_parser().parse_args(["serve", "--http-port", "8080"])
    assert settings_from_args(args, environ={}).http_port == 8080
    assert settings_from_args(args, environ={"LATENTD_HTTP_PORT": "9090"}).http_port == 8080  # the flag wins
    no_flag = build_parser().parse_args(["serve"])
    assert settings_from_args(no_flag, environ={"LATENTD_HTTP_PORT": "0"}).http_port == 0
    (tmp_path / "s.toml").write_text("[server]\nhttp_port = 7070\n")
    assert load_settings(environ={}, file=tmp_path / "s.toml").http_port == 7070


def test_every_setting_has_its_flag_from_the_dataclass():
    """Flags are generated from ServerSettings: each field's flag sets it, with its default in the help."""
    import dataclasses

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    by_dest = {action.dest: action for action in serve._actions}
    own_flags = {"models": "models", "auth_tokens": "auth_tokens_file"}  # --model, --auth-tokens-file
    for field in dataclasses.fields(ServerSettings):
        assert own_flags.get(field.name, field.name) in by_dest, f"no flag for setting {field.name}"
        if field.metadata["flag"] and field.type != "bool":
            assert "(default: " in by_dest[field.name].help
    args = build_parser().parse_args(["serve", "--stream-window", "3", "--no-log-requests", "--max-batch-delay-ms",
                                      "2.5", "--dtype", "bfloat16"])
    settings = settings_from_args(args, environ={})
    assert (settings.stream_window, settings.log_requests, settings.max_batch_delay_ms, settings.dtype) == (
        3, False, 2.5, "bfloat16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--stream-window", "many"])


def test_batch_pixel_policy():
    """Auto: a pixel budget on CPU, none on GPU; the flag and variable set it; a call holds at least one image."""
    auto = load_settings(environ={})
    assert batch_pixel_limit(auto, "cpu") == CPU_BATCH_PIXELS and batch_pixel_limit(auto, "cuda") == 0
    assert batch_pixel_limit(load_settings(environ={"LATENTD_MAX_BATCH_PIXELS": "0"}), "cpu") == 0
    args = build_parser().parse_args(["serve", "--max-batch-pixels", "65536"])
    assert batch_pixel_limit(settings_from_args(args, environ={}), "cuda") == 65536
    encode = lambda side: BatchKey(ENCODE, side, side, "auto", kind=True)  # noqa: E731
    budget = 2 * 256 * 256
    assert items_per_call(encode(64), budget, factor=8) == 32
    assert items_per_call(encode(256), budget, factor=8) == 2
    assert items_per_call(encode(512), budget, factor=8) == 1
    assert items_per_call(BatchKey(DECODE, 32, 32, "auto", kind=4), budget, factor=8) == 2  # 256x256 pixels out
    assert items_per_call(encode(512), CPU_BATCH_PIXELS, factor=8) == 4
    assert items_per_call(encode(512), 0, factor=8) >= 1 << 20


def test_admission_flags_reach_the_settings():
    args = build_parser().parse_args(["serve", "--max-request-pixels", "33554432", "--memory-budget-mb", "512",
                                      "--admission-wait-ms", "250", "--max-concurrent-rpcs", "32"])
    settings = settings_from_args(args, environ={})
    assert (settings.max_request_pixels, settings.memory_budget_mb, settings.admission_wait_ms,
            settings.max_concurrent_rpcs) == (33554432, 512, 250.0, 32)


def test_tile_norms_from_flag_and_environment():
    args = build_parser().parse_args(["serve", "--tile-norms", "tile"])
    assert settings_from_args(args, environ={}).tile_norms == "tile"
    assert load_settings(environ={"LATENTD_TILE_NORMS": "image"}).tile_norms == "image"
    assert load_settings(environ={"LATENTD_TILE_NORMS": "image-recompute"}).tile_norms == "image-recompute"
    with pytest.raises(InvalidInputError) as raised:
        load_settings(environ={"LATENTD_TILE_NORMS": "global"})
    assert raised.value.field == "tile_norms"


def test_compile_from_flag_and_environment_reaches_the_codec_options(monkeypatch):
    from latentd.server import models

    args = build_parser().parse_args(["serve", "--compile", "reduce-overhead"])
    assert settings_from_args(args, environ={}).compile == "reduce-overhead"
    settings = load_settings(environ={"LATENTD_COMPILE": "default"})
    assert settings.compile == "default" and ServerSettings().compile == "off"
    for values in ({"compile": "fast"}, {"compile": "default", "tile_norms": "image"}):
        with pytest.raises(InvalidInputError) as raised:
            ServerSettings(**values)
        assert raised.value.field == "compile"
    seen = []

    def load_codec(source, **kwargs):
        seen.append(kwargs["options"])
        raise InvalidInputError("stop here", field="models")

    monkeypatch.setattr(models, "load_codec", load_codec)
    pool = models.ModelPool(settings)
    try:
        with pytest.raises(InvalidInputError, match="stop here"):
            pool.load()
    finally:
        pool.stop()
    assert [options.compile for options in seen] == ["default"]


def test_overlap_from_flag_and_environment_and_what_auto_means():
    from latentd.server.models import overlaps

    assert load_settings(environ={}).overlap == "auto"
    assert settings_from_args(build_parser().parse_args(["serve", "--overlap", "on"]), environ={}).overlap == "on"
    assert load_settings(environ={"LATENTD_OVERLAP": "off"}).overlap == "off"
    with pytest.raises(InvalidInputError) as raised:
        load_settings(environ={"LATENTD_OVERLAP": "maybe"})
    assert raised.value.field == "overlap" and "auto, on or off" in str(raised.value)
    assert overlaps("auto", "cuda") and not overlaps("auto", "cpu")
    assert overlaps("on", "cpu") and not overlaps("off", "cuda")
