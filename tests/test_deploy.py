"""deploy/: accelerate configs load, Dockerfiles parse and copy what exists, Kubernetes manifests validate."""

from __future__ import annotations

import io
import json
import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())


@pytest.mark.parametrize("path", sorted((DEPLOY / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.compute_environment.value == "LOCAL_MACHINE" and config.use_cpu is False
    assert config.num_processes % config.num_machines == 0


@pytest.mark.parametrize("path", sorted((DEPLOY / "docker").glob("Dockerfile.*")), ids=lambda p: p.name)
def test_dockerfiles_parse_and_copy_what_exists(path):
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    instructions = parser.structure
    assert instructions, "the Dockerfile parses into instructions"
    known = {"FROM", "ARG", "WORKDIR", "COPY", "RUN", "ENV", "USER", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL",
             "ENTRYPOINT", "CMD", "LABEL", "COMMENT"}
    assert {i["instruction"] for i in instructions} <= known
    for instruction in instructions:
        if instruction["instruction"] == "COPY" and "--from=" not in instruction["value"]:
            *sources, _ = instruction["value"].split()
            for source in sources:
                assert (REPO / source).exists(), f"{path.name} copies {source}, which is not in the repository"
    final = [i for i in instructions if i["instruction"] == "FROM"][-1]["startline"]
    tail = [i for i in instructions if i["startline"] > final]
    users = [i["value"] for i in tail if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime stage runs as a non-root user"
    values = {i["instruction"]: i["value"] for i in tail}
    assert "latentd health" in " ".join(json.loads(values["HEALTHCHECK"].split("CMD", 1)[1]))
    assert json.loads(values["ENTRYPOINT"]) == ["latentd", "serve"]
    assert "50051" in values["EXPOSE"].split() and "9090" in values["EXPOSE"].split()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored


def _load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(folder: Path) -> list[dict]:
    """`kustomize build` for the features these manifests use: resources (files or folders) and
    JSON 6902 patches targeted by kind and name."""
    import jsonpatch

    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents: list[dict] = []
    for resource in kustomization.get("resources", []):
        target = folder / resource
        documents += render(target) if target.is_dir() else _load_documents(target)
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, "a feature the renderer lacks"
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        matches = [i for i, doc in enumerate(documents) if doc["kind"] == patch["target"]["kind"]
                   and doc["metadata"]["name"] == patch["target"]["name"]]
        assert len(matches) == 1, patch
        documents[matches[0]] = jsonpatch.apply_patch(documents[matches[0]], operations)
    return documents


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_rendered_manifests_are_valid_kubernetes(overlay):
    import kubernetes_validate

    documents = render(overlay)
    assert {doc["kind"] for doc in documents} == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                                                  "HorizontalPodAutoscaler"}
    for doc in documents:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    settings = tomllib.loads(next(doc for doc in documents if doc["kind"] == "ConfigMap")["data"]["serve.toml"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings["server"]["grace_s"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings["server"]["port"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == \
        str(settings["server"]["metrics_port"])
    secrets = [env["valueFrom"]["secretKeyRef"] for env in container["env"] if "valueFrom" in env]
    assert secrets and all(ref["optional"] for ref in secrets)
    service = next(doc for doc in documents if doc["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance over pods themselves
    if overlay.name == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"] == "latentd:cuda"
    else:
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def test_every_server_setting_is_documented_with_its_variable():
    from latentd.server.settings import ENV_PREFIX, ServerSettings

    text = (DEPLOY / "README.md").read_text()
    for setting in fields(ServerSettings):
        row = re.search(rf"^\| `{setting.name}` \|(.+)$", text, re.MULTILINE)
        assert row, f"deploy/README.md does not document {setting.name}"
        assert f"`{ENV_PREFIX}{setting.name.upper()}`" in row.group(1)
