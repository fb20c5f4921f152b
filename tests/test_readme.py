"""README.md's examples run on a fresh clone, in the order a reader meets them.

Python blocks are executed; `latentd` commands in bash blocks run for real where that is cheap and
otherwise must parse (`--help` appended); `make` lines name targets and variables the Makefile has.
Examples that need a server get a real `latentd serve` on 127.0.0.1 port 0 serving a tiny model as
`default`, its address put in place of the README's `localhost:50051` (and its HTTP endpoint's in
place of `localhost:8080`). Files the examples name
(`photo.png`, `photos/`) are created in a scratch folder, where every block runs. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_ADDRESS = "localhost:50051"
README_HTTP_ADDRESS = "localhost:8080"  # the HTTP Remote VAE endpoint (`latentd serve --http-port 8080`)
# Commands cheap enough to run for real on the scratch folder; the others are checked with --help.
RUN_FOR_REAL = {"info", "health", "models", "roundtrip", "encode", "inspect", "verify", "decode"}
# Pages others are writing; the README links to them ahead of their arrival.
PENDING_LINKS = {"docs/limits.md", "docs/architecture.md"}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```\s*$", text, re.MULTILINE | re.DOTALL)


BLOCKS = fenced_blocks(README.read_text())
BLOCK_IDS = [f"{i}-{language}" for i, (language, _) in enumerate(BLOCKS)]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block, one a line, comments stripped."""
    return [words for line in code.splitlines() if (words := shlex.split(line, comments=True))]


def makefile() -> tuple[set[str], set[str]]:
    """(targets, variables) of the Makefile."""
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", text, re.MULTILINE))
    variables = set(re.findall(r"^([A-Z_]+)\s*[?:]?=", text, re.MULTILINE))
    return targets, variables


def write_inputs(folder: Path) -> None:
    """photo.png and photos/ (three small photo-like images) for the examples to read."""
    from PIL import Image

    from tests.conftest import smooth_image

    Image.fromarray(smooth_image(48, 64)).save(folder / "photo.png")
    (folder / "photos").mkdir()
    for seed in range(3):
        Image.fromarray(smooth_image(40 + 8 * seed, 56, seed=seed)).save(folder / "photos" / f"img{seed}.png")


def start_server(model_dir: Path) -> tuple[subprocess.Popen, int, int]:
    """`latentd serve` on 127.0.0.1 port 0 (HTTP too) with the tiny model as `default`; (process, port,
    HTTP port) once serving."""
    script = Path(sys.executable).with_name("latentd")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "latentd.client.cli"]
    env = {**os.environ, "LATENTD_LOG_REQUESTS": "false", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "serve", "--host", "127.0.0.1", "--port", "0",
                                "--http-port", "0", "--model", f"default={model_dir}"], stderr=subprocess.PIPE,
                               text=True, env=env)
    lines: list[str] = []
    port = http_port = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        port = int(found.group(1)) if found else port
        found = re.search(r"HTTP \(Remote VAE\) on :(\d+)", line)
        http_port = int(found.group(1)) if found else http_port
        if "serving default" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
            assert port and http_port, "".join(lines)
            return process, port, http_port
    process.kill()
    raise RuntimeError("latentd serve did not start:\n" + "".join(lines[-20:]))


def run_python(code: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README is the subject
    return output.getvalue()


def run_bash(code: str, address: str) -> str:
    from latentd.client.cli import main

    targets, variables = makefile()
    report = []
    for words in shell_commands(code):
        program, *args = words
        if program == "make":
            for arg in args:
                if "=" in arg:
                    assert arg.split("=")[0] in variables, f"the Makefile has no variable {arg.split('=')[0]}"
                else:
                    assert arg in targets, f"the Makefile has no target {arg}"
            report.append(f"make {' '.join(args)}: known")
        elif program == "latentd":
            argv = [address if arg == README_ADDRESS else arg for arg in args]
            real = argv[0] in RUN_FOR_REAL
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                code_ = main(argv if real else [*argv, "--help"])
            assert code_ == 0, f"latentd {' '.join(argv)} exited {code_}: {output.getvalue()[-2000:]}"
            assert real or "usage: latentd" in output.getvalue()
            report.append(f"latentd {' '.join(argv)}: {'ran' if real else 'parses'}")
        else:
            raise AssertionError(f"{program}: a README command this test cannot check (make or latentd only)")
    return "\n".join(report)


@pytest.fixture(scope="module")
def readme_results(tmp_path_factory):
    """Every block run in order, in one scratch folder, against one server: {index: (output, error)}."""
    from latentd.vae import save_model

    from tests.conftest import make_tiny_kl

    root = tmp_path_factory.mktemp("readme")
    model_dir = save_model(make_tiny_kl(), root / "tiny-model")
    work = root / "work"
    work.mkdir()
    write_inputs(work)
    process, port, http_port = start_server(model_dir)
    address = f"127.0.0.1:{port}"
    results: dict[int, tuple[str, str | None]] = {}
    previous = Path.cwd()
    os.chdir(work)
    try:
        for index, (language, code) in enumerate(BLOCKS):
            try:
                if language == "python":
                    code = code.replace(README_ADDRESS, address).replace(README_HTTP_ADDRESS, f"127.0.0.1:{http_port}")
                    results[index] = (run_python(code), None)
                elif language == "bash":
                    results[index] = (run_bash(code, address), None)
                else:
                    results[index] = ("", f"a {language or 'plain'} block: only python and bash blocks can be checked")
            except BaseException:  # noqa: BLE001 - reported by the block's own test
                results[index] = ("", traceback.format_exc())
    finally:
        os.chdir(previous)
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return results


@pytest.mark.slow  # one server start and real CLI runs: about 30 s on 2 shared cores
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=BLOCK_IDS)
def test_readme_block_runs(readme_results, index):
    output, error = readme_results[index]
    assert error is None, f"README block {index}:\n{BLOCKS[index][1]}\n{output}\n{error}"


def test_readme_is_a_map():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert any(language == "python" for language, _ in BLOCKS) and any(language == "bash" for language, _ in BLOCKS)


DOCS = sorted((REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_links_exist(page):
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text())
    local = [(page.parent / link).resolve() for link in links if "://" not in link]
    pending = {REPO / link for link in PENDING_LINKS}
    missing = [str(link.relative_to(REPO)) for link in local if not link.exists() and link not in pending]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


def check_parses(argv: list[str]) -> None:
    from latentd.client.cli import main

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = main([*argv, "--help"])
    assert code == 0 and "usage: latentd" in output.getvalue(), f"latentd {' '.join(argv)} does not parse"
    for arg in argv:  # files of the repository that a command names (configs) exist
        if arg.endswith((".yaml", ".yml", ".toml")) and "/" in arg:
            assert (REPO / arg).exists(), f"latentd {' '.join(argv)}: {arg} is not in the repository"


def test_readme_inline_commands_parse():
    """`latentd ...` commands quoted in the README's text and tables (the benchmarks, the quality runs)."""
    inline = [span for span in re.findall(r"`(latentd [^`]+)`", README.read_text()) if "..." not in span]
    commands = [shlex.split(span)[1:] for span in inline]
    commands = [argv for argv in commands if not any(arg.isupper() for arg in argv)]  # placeholders: CONFIG, DIR
    assert len(commands) >= 4
    for argv in commands:
        check_parses(argv)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_commands_parse(page):
    """`latentd` lines of the docs' bash blocks parse (their files are the reader's, so they do not run)."""
    for language, code in fenced_blocks(page.read_text()):
        if language == "bash":
            for words in shell_commands(code):
                if words[0] == "latentd":
                    check_parses(words[1:])


def test_docs_index_lists_every_page():
    index = (REPO / "docs" / "README.md").read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not list {page.name}"
