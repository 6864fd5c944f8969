"""The documents' code blocks, run as written: every fenced block of README.md and docs/*.md.

A fence's language says what the block is, and an HTML comment on the line right before the fence may say how it
is checked (README.md, "Tests", states the same rules for writers):

- ``bash`` (or ``sh``, ``shell``): commands. Each logical line (backslash continuations joined) runs with bash
  in a scratch copy of the repository (tracked files, ``.venv`` linked), with the venv's ``bin`` on ``PATH``, and
  must exit 0. ``imageserve run`` is a server: it gets a free port (``--port``), must print that it answers,
  and must stop cleanly on Ctrl-C (SIGINT).
- ``python``: a script, run with the venv's python in the same folder; it must exit 0.
- ``yaml``, ``json``: need a ``checked as ...`` marker, or ``not run here``.
- ``text``: output, layouts, diagrams; not run, unless marked ``output of: COMMAND``.
- Any other fence, or one without a language, fails ``test_every_block_is_classified``.

Markers (one per block):

- ``<!-- not run here: REASON -->``: not run (docker, kubectl, ray up, a GPU, the Hub, minutes of CPU); the
  reason is required.
- ``<!-- runs against imageserve run -->``: run while ``imageserve run`` serves the embedded default, in a folder
  that holds two small PNGs, ``a.png`` and ``b.png``. ``localhost:8000`` and ``127.0.0.1:8000`` become that
  service's address; python scripts get ``RAY_ADDRESS``, ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN_PATH`` as
  ``imageserve run`` prints them (what README tells a driver to set). curl runs with ``--fail-with-body``,
  so an HTTP error fails the block.
- ``<!-- checked as an imageserve config -->``, ``a fleet file``, ``a Serve config``, ``a generation request``,
  ``a batch input line``: the YAML or JSON validates as that.
- ``<!-- output of: COMMAND -->``: a text block; every line of it is a line of COMMAND's output (runs of
  spaces compared as one).

A runnable block that addresses the service without the marker, or that would run docker, kubectl, ray, serve,
make image, make test or pip here, fails without running.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL = ("bash", "sh", "shell")
NOT_RUN = re.compile(r"not run here: (?P<reason>\S.*)")
AGAINST_SERVICE = "runs against imageserve run"
CHECKED_AS = re.compile(r"checked as (?P<what>.+)")
OUTPUT_OF = re.compile(r"output of: (?P<command>\S.*)")
MARKER = re.compile(r"^\s*<!--\s*(?P<text>(?:not run here|runs against|checked as|output of)\b.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
# Where the documents say the service answers; the test's service answers elsewhere (a free port).
DOCUMENTED_ADDRESS = re.compile(r"\b(localhost|127\.0\.0\.1):8000\b")
# Programs that reach outside this test's own processes (a Docker daemon, a Kubernetes or Ray cluster, a
# machine-wide Ray, a package index) or that are the suite itself.
NEVER_HERE = re.compile(r"(^|[;&|(]\s*)(docker|kubectl|ray|serve|helm|ssh|sudo|pip|pip3|make\s+(image|test|lock))\b")
SERVER = re.compile(r"^imageserve\s+run\b")
ANSWERING = re.compile(r"imageserve is answering at http://")
# KNOWN_FAILURES: block id -> why (the issue item whose fix makes it pass). Empty: every runnable block passes.
KNOWN_FAILURES: dict[str, str] = {}


@dataclass(frozen=True)
class Block:
    document: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"

    def commands(self) -> list[str]:
        """The block's shell commands: logical lines, without blank and comment-only lines."""
        joined = re.sub(r"\\\n", " ", self.text)
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def read_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one Markdown file, and the problems of its markers (one not followed by a fence)."""
    lines = path.read_text().splitlines()
    document = str(path.relative_to(ROOT))
    blocks, problems = [], []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            if MARKER.match(lines[index]) and not (index + 1 < len(lines) and FENCE.match(lines[index + 1])):
                problems.append(f"{document}:{index + 1}: a marker must be the line right before a fence")
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        end = index + 1
        while end < len(lines) and not re.fullmatch(rf"\s*{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[end]):
            end += 1
        marker = MARKER.match(lines[index - 1]) if index else None
        # A fence indented in a list item: its lines lose that indent (and no more).
        body = "\n".join(re.sub(rf"^ {{0,{indent}}}", "", line) for line in lines[index + 1:end])
        blocks.append(Block(document, index + 1, opening["info"].split()[0] if opening["info"].split() else "",
                            body + "\n", marker["text"] if marker else None))
        index = end + 1
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in DOCUMENTS:
        found, wrong = read_blocks(path)
        blocks += found
        problems += wrong
    return blocks, problems


BLOCKS, MARKER_PROBLEMS = all_blocks()


def classify(block: Block) -> str:
    """What the test does with ``block``: "skip", "service", "run", "check", "output" or "text" (nothing); or
    raises ValueError saying what the block needs to be classified."""
    marker = block.marker or ""
    if NOT_RUN.fullmatch(marker):
        return "skip"
    if marker == AGAINST_SERVICE:
        if block.language not in (*SHELL, "python"):
            raise ValueError(f"`{AGAINST_SERVICE}` is for bash and python blocks, not {block.language or 'none'}")
        return "service"
    if CHECKED_AS.fullmatch(marker):
        what = CHECKED_AS.fullmatch(marker)["what"]
        if what not in CHECKS:
            raise ValueError(f"checked as {what!r}: the test knows {', '.join(map(repr, CHECKS))}")
        return "check"
    if OUTPUT_OF.fullmatch(marker):
        if block.language != "text":
            raise ValueError("`output of:` is for text blocks")
        return "output"
    if marker.startswith("not run here"):
        raise ValueError("<!-- not run here: REASON --> needs its reason")
    if marker:
        raise ValueError(f"unknown marker {marker!r}")
    if block.language == "text":
        return "text"
    if block.language in (*SHELL, "python"):
        if DOCUMENTED_ADDRESS.search(block.text) or "get_app_handle" in block.text:
            raise ValueError(f"it addresses the service: mark it <!-- {AGAINST_SERVICE} -->")
        return "run"
    if block.language in ("yaml", "json"):
        raise ValueError("a yaml or json block needs <!-- checked as ... --> or <!-- not run here: ... -->")
    what = f"a {block.language} block" if block.language else "a fence without a language"
    raise ValueError(f"the test cannot run {what}: give it a language (text for output and layouts), or "
                     "<!-- not run here: REASON -->")


def is_server(command: str) -> bool:
    """`imageserve run`: it serves until stopped."""
    return bool(SERVER.match(command))


def refuse_outside(block: Block) -> None:
    """Fail before running a block that would reach outside this test's own processes."""
    if block.language not in SHELL:
        return
    for command in block.commands():
        found = NEVER_HERE.search(command)
        if found:
            pytest.fail(f"{block.id}: `{command}` would run {found.group(2)} here: mark the block "
                        "<!-- not run here: REASON -->")


# Checks of the yaml and json blocks.

def check_imageserve_config(text: str, source: str) -> None:
    from serve_app.domain.config import parse_config

    parse_config(yaml.safe_load(text), source)


def check_fleet_file(text: str, source: str) -> None:
    from serve_app.domain.config import parse_fleet

    parse_fleet(yaml.safe_load(text), source)


def check_serve_config(text: str, source: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(text))


def check_generation_request(text: str, source: str) -> None:
    from serve_app.domain.schemas import GenerateRequest

    GenerateRequest.model_validate(json.loads(text))


def check_batch_input_line(text: str, source: str) -> None:
    """One line of a batch's input file, as the batch runner reads it (docs/batch.md), for the URL it names."""
    from serve_app.domain.batches import BatchSettings, parse_input_file

    line = json.loads(text)
    (parsed,), refused = parse_input_file(json.dumps(line).encode(), line["url"], BatchSettings())
    assert refused is None and parsed.error is None, parsed.error or refused


CHECKS = {"an imageserve config": check_imageserve_config, "a fleet file": check_fleet_file,
          "a Serve config": check_serve_config, "a generation request": check_generation_request,
          "a batch input line": check_batch_input_line}


def by_kind(*kinds: str) -> list[Block]:
    chosen = []
    for block in BLOCKS:
        try:
            if classify(block) in kinds:
                chosen.append(block)
        except ValueError:
            pass  # test_every_block_is_classified names it
    return chosen


def params(blocks: list[Block]) -> list:
    """Each block as a test; one that runs a benchmark takes seconds and is left out of `make unit` (``models``)."""
    def marks(block: Block) -> list:
        found = [pytest.mark.xfail(reason=KNOWN_FAILURES[block.id], strict=True)] if block.id in KNOWN_FAILURES else []
        if any("-m bench." in command for command in block.commands()):
            found.append(pytest.mark.models)
        return found

    return [pytest.param(block, id=block.id, marks=marks(block)) for block in blocks]


# The folder blocks run in, and their environment.

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch copy of the repository's tracked files, the venv linked in, and a.png and b.png: commands that
    write files write them here. The copies are dated 2000-01-01, before any `make install`: make then sees the
    linked venv's install as up to date (the tests run on that install), where a fresher Makefile or lock would
    have it reinstall into the real venv from this copy."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("documents") / "imageserve"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
            os.utime(folder / name, (946684800, 946684800))
    venv = Path(sys.prefix)
    (folder / ".venv").symlink_to(venv if venv != Path(sys.base_prefix) else ROOT / ".venv")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "b.png")
    (folder.parent / "home").mkdir()  # IMAGESERVE_HOME: nothing lands in the user's ~/.cache
    return folder


@pytest.fixture(scope="module")
def tiny_home(workdir, tiny_root) -> None:
    """`imageserve run` keeps its tiny checkpoints under IMAGESERVE_HOME: there, the session's, built once."""
    (workdir.parent / "home" / "tiny-models").symlink_to(tiny_root, target_is_directory=True)


@pytest.fixture(scope="module")
def environment(workdir, tmp_path_factory) -> dict[str, str]:
    """The blocks' environment: a user's shell with the venv's bin first on PATH and curl failing on HTTP errors;
    no Hub, and none of the suite's RAY_* or IMAGESERVE_* settings (its tests' clusters run without Ray's token
    auth, while `imageserve run` locks its cluster with a token of its own)."""
    real_curl = shutil.which("curl")
    assert real_curl, "curl is not installed: the documents' examples use it"
    shims = tmp_path_factory.mktemp("shims")
    (shims / "curl").write_text(f'#!/bin/sh\nexec {shlex.quote(real_curl)} --fail-with-body "$@"\n')
    (shims / "curl").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "IMAGESERVE_"))}
    env.update(PATH=os.pathsep.join([str(shims), str(Path(sys.executable).parent), env.get("PATH", "")]),
               HF_HUB_OFFLINE="1", IMAGESERVE_HOME=str(workdir.parent / "home"))
    return env


def make_is_installed(workdir: Path, env: dict[str, str]) -> None:
    """make's targets depend on `make install`, which from the copy would point the real venv's editable install at
    the copy: refuse to run them without an install (its stamp, .venv/.installed)."""
    stale = subprocess.run(["make", "-q", "install"], cwd=workdir, env=env, capture_output=True)
    assert stale.returncode == 0, "no `make install` in .venv: run it first (the documents assume it)"


def run_command(command: str, workdir: Path, env: dict[str, str], what: str, timeout_s: float = 300) -> str:
    if re.match(r"make\b", command):
        make_is_installed(workdir, env)
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, (f"{what}: `{command}` exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                                  f"\n--- stderr\n{done.stderr[-3000:]}")
    return done.stdout


def run_python(block: Block, workdir: Path, env: dict[str, str], timeout_s: float = 300) -> None:
    script = workdir / f"block_{Path(block.document).stem}_{block.line}.py"
    script.write_text(block.text)
    done = subprocess.run([sys.executable, script.name], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert done.returncode == 0, (f"{block.id}: the script exited {done.returncode}\n--- stdout\n"
                                  f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}")


class ForegroundServer:
    """`imageserve run` as a user starts it in a terminal: it prints, serves until Ctrl-C, then stops."""

    def __init__(self, command: str, workdir: Path, env: dict[str, str]) -> None:
        from serve_app.runner import free_port

        self.port = free_port()
        self.command = SERVER.sub(f"imageserve run --port {self.port}", command, count=1)
        # exec: the signal goes to imageserve itself, as a terminal's Ctrl-C does, not to a shell around it.
        self.process = subprocess.Popen(["bash", "-c", f"exec {self.command}"], cwd=workdir, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.answering = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if ANSWERING.search(line):
                self.answering.set()
        self.answering.set()  # the process ended: nothing more will come

    def output(self) -> str:
        return "".join(self.lines)

    def wait_until_answering(self, timeout_s: float = 600) -> None:
        """Until it says it answers, which it does once /readyz answers 200."""
        self.answering.wait(timeout_s)
        if not ANSWERING.search(self.output()):
            self.stop(check=False)
            pytest.fail(f"`{self.command}` did not say it answers (exit {self.process.poll()}):\n"
                        f"{self.output()[-5000:]}")

    def driver_environment(self) -> dict[str, str]:
        """What a Python driver needs to attach, from the line `imageserve run` prints about its token."""
        text = self.output()
        address = re.search(r"(?:RAY_ADDRESS=|Ray at )(\S+)", text)
        token = re.search(r"RAY_AUTH_TOKEN_PATH=([^\s)]+)", text)
        assert address and token, f"`{self.command}` printed no Ray address and token path:\n{text[-3000:]}"
        return {"RAY_ADDRESS": address[1], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token[1]}

    def stop(self, timeout_s: float = 180, check: bool = True) -> None:
        """Ctrl-C; with ``check``, a clean exit: status 0, and it says the private cluster is shut down."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        self.reader.join(10)
        if check:
            assert code == 0 and "stopped" in self.output(), (
                f"`{self.command}` exited {code} after Ctrl-C (None: still running {timeout_s} s later):\n"
                f"{self.output()[-3000:]}")


# The tests. Order matters for the CPU: the blocks that start nothing first, then the one shared service,
# then each server block alone.

def test_every_block_is_classified():
    problems = list(MARKER_PROBLEMS)
    for block in BLOCKS:
        try:
            classify(block)
        except ValueError as err:
            problems.append(f"{block.id} ({block.language or 'no language'}): {err}")
    assert not problems, "\n".join(problems)


def test_the_documents_have_blocks_of_every_kind():
    """The parser finds what the documents hold (a broken parser would check nothing and pass)."""
    kinds = {kind for kind in ("skip", "service", "run", "check", "output", "text") if by_kind(kind)}
    assert {"skip", "service", "run", "check", "output"} <= kinds, kinds


@pytest.mark.parametrize("block", params(by_kind("check")))
def test_block_validates(block):
    what = CHECKED_AS.fullmatch(block.marker)["what"]
    CHECKS[what](block.text, block.id)


@pytest.mark.parametrize("block", params(by_kind("output")))
def test_block_is_the_output_of_its_command(block, workdir, environment):
    command = OUTPUT_OF.fullmatch(block.marker)["command"]
    produced = {" ".join(line.split()) for line in run_command(command, workdir, environment, block.id).splitlines()}
    missing = [line for line in block.text.splitlines() if line.strip() and " ".join(line.split()) not in produced]
    assert not missing, f"{block.id}: `{command}` no longer prints:\n" + "\n".join(missing)


@pytest.mark.parametrize("block", params([b for b in by_kind("run") if not any(map(is_server, b.commands()))]))
def test_block_runs(block, workdir, environment):
    refuse_outside(block)
    if block.language == "python":
        run_python(block, workdir, environment)
        return
    for command in block.commands():
        run_command(command, workdir, environment, block.id)


@pytest.mark.integration
class TestAgainstImageserveRun:
    """The examples of using the service, against one `imageserve run` (what `make serve` runs) on the embedded
    default."""

    @pytest.fixture(scope="class")
    def service(self, workdir, environment, tiny_home):
        server = ForegroundServer("imageserve run", workdir, environment)
        server.wait_until_answering()
        yield server
        server.stop()

    @pytest.mark.parametrize("block", params(by_kind("service")))
    def test_block_runs_against_the_service(self, block, service, workdir, environment):
        refuse_outside(block)
        driver = service.driver_environment()
        rewritten = Block(block.document, block.line, block.language,
                          DOCUMENTED_ADDRESS.sub(lambda m: f"{m[1]}:{service.port}", block.text), block.marker)
        if block.language == "python":
            run_python(rewritten, workdir, {**environment, **driver})
            return
        for command in rewritten.commands():
            run_command(command, workdir, environment, block.id)


SERVED: dict[str, str | None] = {}  # server command -> why it failed (None: it served and stopped cleanly)


@pytest.mark.integration
@pytest.mark.parametrize("block", params([b for b in by_kind("run") if any(map(is_server, b.commands()))]))
def test_block_serves_and_stops_on_ctrl_c(block, workdir, environment, tiny_home):
    """Blocks that start `imageserve run`: the commands before it run, then it serves and stops on Ctrl-C. The
    same command in two documents is served once."""
    refuse_outside(block)
    for command in block.commands():
        if not is_server(command):
            run_command(command, workdir, environment, block.id)
            continue
        key = " ".join(shlex.split(command, comments=True))
        if key not in SERVED:
            SERVED[key] = None
            server = ForegroundServer(command, workdir, environment)
            try:
                server.wait_until_answering()
                server.stop()
            except (AssertionError, pytest.fail.Exception) as err:
                SERVED[key] = str(err)
        assert SERVED[key] is None, f"{block.id}: {SERVED[key]}"


def test_every_benchmark_is_listed_and_documented():
    """README's layout lists every bench module, and docs/benchmarks.md has a block running each."""
    modules = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"__init__", "common"}
    readme = (ROOT / "README.md").read_text()
    listing = re.search(r"python -m bench\.([\w |\n]+?)\n\s*\(docs/benchmarks\.md\)", readme)
    assert listing, "README's layout no longer lists the bench modules as `python -m bench.a | b | ...`"
    listed = {name.strip() for name in listing[1].split("|")}
    assert listed == modules, f"README lists {sorted(listed - modules)}, which do not exist, and misses " \
                              f"{sorted(modules - listed)}"
    blocks = " ".join(b.text for b in BLOCKS if b.document == "docs/benchmarks.md")
    unrun = sorted(m for m in modules if f"-m bench.{m}" not in blocks)
    assert not unrun, f"no block of docs/benchmarks.md runs {unrun}"


def test_every_command_option_is_documented():
    """Each option of each `imageserve` command is named in README.md or docs/*.md, in a paragraph or block that
    names the command (`--help` is not a user's first stop)."""
    from serve_app.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    chunks = []
    for path in DOCUMENTS:
        chunks += re.split(r"\n\s*\n", path.read_text())
    missing = []
    for name, command in commands.items():
        about = " ".join(c for c in chunks if f"imageserve {name}" in c or (name == "run" and "make serve" in c))
        for action in command._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and not re.search(rf"{option}\b", about):
                    missing.append(f"imageserve {name} {option}")
    assert not missing, "undocumented: " + ", ".join(missing)
