"""The server's one typed settings object, filled from a file, then LATENTD_* environment variables, then flags."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from latentd.vae.errors import InvalidInputError
from latentd.vae.options import COMPILE_MODES, TILE_NORMS

ENV_PREFIX = "LATENTD_"


def setting(default: Any = None, help: str = "", *, factory: Any = None, default_text: str | None = None,
            choices: tuple[str, ...] | None = None, flag: bool = True) -> Any:
    """A settings field with what its `latentd serve` flag says: `help`, and `default_text` where the
    default needs words (None, a computed value). `flag=False`: set by a file or the environment only,
    or by a flag of its own (models, auth tokens)."""
    metadata = {"help": help, "default_text": default_text, "choices": choices, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    """Every server setting: its type, default and meaning, once. `latentd serve` makes a flag of each
    (`--max-batch-size`), the environment a `LATENTD_MAX_BATCH_SIZE`, and a settings file a key."""

    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 for every interface (loopback unless asked: the "
                                     "server has no auth by default)")
    port: int = setting(50051, "port; 0: any free port; one in use: exit 2")
    # Served models, name -> registry name, model folder, checkpoint file or Hub id. The first is the default.
    models: Mapping[str, str] = setting(factory=lambda: {"default": "default"}, flag=False)
    device: str | None = setting(None, "cpu, cuda, cuda:1", default_text="CUDA if available, else CPU")
    dtype: str | None = setting(None, "compute dtype", default_text="bfloat16 or float16 on a GPU, float32 on a CPU",
                                choices=("float32", "float16", "bfloat16"))
    max_batch_size: int = setting(8, "images per model call")
    max_batch_delay_ms: float = setting(5.0, "how long the first item of a batch waits for company")
    # What an interactive request arriving during bulk work may wait for: on a CPU, where a call's time
    # grows with its images, 1 keeps it near one image's time (bulk throughput pays for small images).
    bulk_max_batch_size: int | None = setting(None, "images per model call in batches that bulk work leads",
                                              default_text="max_batch_size")
    # One thread uses a bigger batch better, and the core it leaves meanwhile serves the requests.
    busy_batch_delay_ms: float = setting(20.0, "how long a batch waits to fill while another batch computes on a "
                                               "CPU lane")
    max_batch_pixels: int | None = setting(None, "image pixels per model call, summed over its images (a batch "
                                                 "always takes one); 0: unlimited",
                                           default_text="four 512x512 images on a CPU, which bounds a call's "
                                                        "memory; unlimited on a GPU")
    # Small images use threads better side by side; a lone batch gets every thread.
    cpu_compute_lanes: int = setting(2, "on a CPU, batches of small images that meet run side by side on this "
                                        "many lanes, each with an equal share of the threads; 1: one at a time")
    # A device idles while its one lane's batch converts inputs and outputs; a CPU computes with the same cores.
    overlap: str = setting("auto", "run a batch's host work (input and output conversion) beside another batch's "
                                   "model call, on two workers per model", default_text="auto: on a GPU",
                           choices=("auto", "on", "off"))
    queue_limit: int = setting(256, "images waiting per model (beyond the batches its workers hold); then "
                                    "RESOURCE_EXHAUSTED, and a request with more images is INVALID_ARGUMENT")
    stream_window: int = setting(16, "requests of one stream in flight (or answered but not yet read)")
    max_message_mb: int = setting(64, "gRPC send and receive message size limit")
    max_pixels: int = setting(4096 * 4096, "largest image, in and out, in pixels", default_text="4096x4096")
    tile_norms: str = setting("tile", "GroupNorm statistics of tiled images: tile (each tile's own: one tile's "
                                      "memory, visible seams), image (the whole image's: tiles equal the "
                                      "untiled result, with every tile's activations held, counted in "
                                      "memory_budget_mb) or "
                                      "image-recompute (the same result in one tile's memory, for about twice "
                                      "tile's compute, counted as three times its tiles in max_request_pixels, "
                                      "and one layer of the image's activations per compute lane in $TMPDIR)",
                              choices=TILE_NORMS)
    compile: str = setting("off", "torch.compile each model's encoder and decoder (reduce-overhead: CUDA graphs, "
                                  "one per input size); the warm-up compiles before health turns SERVING",
                           choices=COMPILE_MODES)
    max_request_pixels: int = setting(64 * 1024 * 1024, "model work one request may cost, in image pixels in and "
                                                        "out (padded to the model's factor, tile overlaps counted; "
                                                        "see costs.py); beyond it INVALID_ARGUMENT",
                                      default_text="67108864, four tiled 4096x4096 encodes")
    memory_budget_mb: int = setting(2048, "server memory held by requests at once (received bytes, decoded "
                                          "pixels, latents, answers)")
    admission_wait_ms: float = setting(1000.0, "how long a request waits for room in the memory budget before "
                                               "RESOURCE_EXHAUSTED")
    max_concurrent_rpcs: int = setting(128, "RPCs in progress at once (a stream counts once, health too); beyond "
                                            "it RESOURCE_EXHAUSTED")
    tls_cert: str | None = setting(None, "server certificate (PEM); with --tls-key enables TLS", default_text="off")
    tls_key: str | None = setting(None, "server private key (PEM)", default_text="none")
    tls_client_ca: str | None = setting(None, "require client certificates signed by this CA (mutual TLS)",
                                        default_text="off")
    # Non-empty: every call needs `authorization: Bearer <token>`. Never a flag (it would show in `ps`).
    auth_tokens: tuple[str, ...] = setting((), flag=False)
    metrics_port: int | None = setting(None, "serve Prometheus /metrics over HTTP on this port", default_text="off")
    metrics_host: str = setting("127.0.0.1", "address of the metrics endpoint")
    http_port: int | None = setting(None, "also serve the Hugging Face Remote VAE HTTP protocol (diffusers' "
                                          "remote_decode / remote_encode) on this port, same host, models, limits, "
                                          "auth and TLS; 0: any free port", default_text="off")
    grace_s: float = setting(10.0, "seconds in-flight requests get on SIGTERM")
    warmup: bool = setting(True, "one encode and decode per model before health turns SERVING")
    log_requests: bool = setting(True, "one log line per request")

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535, "must be 0-65535"),
            ("http_port", self.http_port is None or 0 <= self.http_port <= 65535, "must be 0-65535"),
            ("models", bool(self.models), "needs at least one model"),
            ("max_batch_size", self.max_batch_size >= 1, "must be at least 1"),
            ("max_batch_delay_ms", self.max_batch_delay_ms >= 0, "must be >= 0"),
            ("bulk_max_batch_size", self.bulk_max_batch_size is None or self.bulk_max_batch_size >= 1,
             "must be at least 1"),
            ("busy_batch_delay_ms", self.busy_batch_delay_ms >= 0, "must be >= 0"),
            ("max_batch_pixels", self.max_batch_pixels is None or self.max_batch_pixels >= 0, "must be >= 0"),
            ("cpu_compute_lanes", self.cpu_compute_lanes >= 1, "must be at least 1"),
            ("overlap", self.overlap in ("auto", "on", "off"), "must be auto, on or off"),
            ("queue_limit", self.queue_limit >= 1, "must be at least 1"),
            ("stream_window", self.stream_window >= 1, "must be at least 1"),
            ("max_message_mb", self.max_message_mb >= 1, "must be at least 1"),
            ("max_pixels", self.max_pixels >= 64, "must be at least 64"),
            ("tile_norms", self.tile_norms in TILE_NORMS, f"must be one of {', '.join(TILE_NORMS)}"),
            ("compile", self.compile in COMPILE_MODES, f"must be one of {', '.join(COMPILE_MODES)}"),
            ("compile", self.compile == "off" or self.tile_norms == "tile", "needs tile_norms tile"),
            ("max_request_pixels", self.max_request_pixels >= self.max_pixels, "must be at least max_pixels"),
            ("memory_budget_mb", self.memory_budget_mb >= 1, "must be at least 1"),
            ("admission_wait_ms", self.admission_wait_ms >= 0, "must be >= 0"),
            ("max_concurrent_rpcs", self.max_concurrent_rpcs >= 1, "must be at least 1"),
            ("grace_s", self.grace_s >= 0, "must be >= 0"),
            ("tls_key", (self.tls_cert is None) == (self.tls_key is None), "tls_cert and tls_key go together"),
            ("tls_client_ca", self.tls_client_ca is None or self.tls_cert is not None, "mutual TLS needs tls_cert"),
            ("auth_tokens", all(token.strip() for token in self.auth_tokens), "tokens must not be empty"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidInputError(f"setting {name}: {message}", field=name)

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def redacted(self) -> dict[str, Any]:
        """The settings for logs: tokens are counted, never shown."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["auth_tokens"] = f"{len(self.auth_tokens)} token(s)"
        shown["models"] = dict(self.models)
        return shown


def parse_models(items: list[str] | str) -> dict[str, str]:
    """`NAME=SOURCE` items (or one comma-separated string); a bare `SOURCE` is named after itself."""
    if isinstance(items, str):
        items = [item for item in items.split(",") if item.strip()]
    models: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        name, source = (name.strip(), source.strip()) if sep else (Path(item.strip()).name, item.strip())
        if not name or not source:
            raise InvalidInputError(f"--model {item!r}: expected NAME=PATH_OR_REGISTRY_NAME", field="models")
        models[name] = source
    return models


def _coerce(name: str, value: Any) -> Any:
    """A value from a file, the environment (always a string) or a flag, as the field's type."""
    default = {f.name: f for f in fields(ServerSettings)}[name]
    kind = str(default.type)
    if value is None:
        return None
    try:
        if name == "models":
            return parse_models(value) if isinstance(value, (str, list)) else {str(k): str(v) for k, v in value.items()}
        if name == "auth_tokens":
            return tuple(t.strip() for t in value.split(",") if t.strip()) if isinstance(value, str) else tuple(value)
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"setting {name}: cannot read {value!r} as {kind}", field=name) from exc


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML, YAML or JSON file of settings (top level, or under a `server` table)."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"settings file {path}: {exc}", field="config") from exc
    except ImportError as exc:
        raise InvalidInputError(f"settings file {path}: {exc}; install PyYAML or use TOML/JSON",
                                field="config") from exc
    data = data.get("server", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise InvalidInputError(f"settings file {path}: expected a table of settings", field="config")
    return data


def load_settings(flags: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
                  file: str | os.PathLike | None = None) -> ServerSettings:
    """File < environment < flags; flags and file entries that are None are not set."""
    known = {f.name for f in fields(ServerSettings)}
    values: dict[str, Any] = {}
    layers = [
        read_settings_file(file) if file else {},
        {key[len(ENV_PREFIX):].lower(): value for key, value in (os.environ if environ is None else environ).items()
         if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in known},
        {key: value for key, value in (flags or {}).items() if value is not None},
    ]
    for layer in layers:
        for key, value in layer.items():
            if key not in known:
                raise InvalidInputError(f"unknown setting {key!r} (known: {', '.join(sorted(known))})", field=key)
            values[key] = _coerce(key, value)
    return replace(ServerSettings(), **values)
