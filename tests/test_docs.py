"""The docs say what the code does: every `console` example runs as printed, every link lands, every page is in the
site's nav, and the CLI reference covers every command.

A ```console block in docs/*.md or README.md is a session: each `$ COMMAND` line is run and its output (stdout and
stderr, as a terminal shows them) must equal the lines that follow it, up to the next `$ ` line or the block's end.
In the expected output a line `...` stands for any number of lines; trailing spaces are ignored, and so are the
values of decimal durations (`0.01 s`, `0.3s`), which no two runs share. Examples that need a cloud, a server or
minutes belong in ```bash or ```text blocks, which are not run.

A block runs in a fresh directory that links the repository's examples/, tests/, bench/, templates/ and docs/ (so
paths read as from the repository's root, and files a command writes land in the temporary directory), with a fresh
HOME and MELANGE_SKY_HOME and no HF_TOKEN or keys from the caller's environment. `melange-sky ...` runs in-process
through Click's runner (fast); `cat` and `ls` run as themselves. Any other command in a console block is an error:
show it as ```bash instead.
"""
from __future__ import annotations

import difflib
import importlib.util
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from markdown.extensions.toc import slugify

from melange_sky.cli import all_commands, main
from melange_sky.core.config import GPU_KEYS, TOP_LEVEL_KEYS
from melange_sky.deploy.plan import DEPLOYMENT_KEYS
from melange_sky.deploy.router_config import ROUTER_KEYS, TLS_KEYS

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
DOC_FILES = [*PAGES, REPO / "README.md"]
LINKED_DIRS = ("examples", "tests", "bench", "templates", "docs")
SHELL_COMMANDS = {"cat", "ls"}
# Variables a reader's shell may hold that would change what the commands print.
CLEARED_ENV = ("HF_TOKEN", "MELANGE_SKY_API_KEY", "MELANGE_SKY_UPSTREAM_API_KEY", "MELANGE_SKY_ADMIN_TOKEN",
               "MELANGE_SKY_BACKEND", "MELANGE_SKY_DEBUG")
DURATION = re.compile(r"\b\d+\.\d+ ?s\b")


@dataclass(frozen=True)
class Step:
    """One `$ command` line of a console block and the output printed under it."""

    line: int
    command: str
    expected: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    steps: tuple[Step, ...]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def console_blocks(path: Path) -> list[Block]:
    """The ```console blocks of a Markdown file, split into steps."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        start, i = i + 1, i + 1
        steps: list[Step] = []
        while i < len(lines) and lines[i].strip() != "```":
            text = lines[i]
            if text.startswith("$ "):
                steps.append(Step(i + 1, text[2:].strip(), ()))
            elif steps:
                last = steps[-1]
                steps[-1] = Step(last.line, last.command, (*last.expected, text))
            else:
                raise AssertionError(f"{path.relative_to(REPO)}:{i + 1}: a console block must start with a `$ ` line")
            i += 1
        blocks.append(Block(path, start, tuple(steps)))
        i += 1
    return blocks


BLOCKS = [block for path in DOC_FILES for block in console_blocks(path)]


def normalise(lines: list[str] | tuple[str, ...]) -> list[str]:
    out = [DURATION.sub("<duration>", line.rstrip()) for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether the actual lines are the expected ones, where an expected `...` line stands for any lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and actual[0] == expected[0] and matches(expected[1:], actual[1:])


@pytest.fixture
def session_dir(tmp_path: Path) -> Path:
    return make_session_dir(tmp_path)


def make_session_dir(base: Path) -> Path:
    """A working directory that reads as the repository's root, and a HOME of its own, for one block."""
    work = base / "work"
    work.mkdir()
    for name in LINKED_DIRS:
        (work / name).symlink_to(REPO / name, target_is_directory=True)
    (base / "home").mkdir()
    return work


def run_step(command: str, work: Path) -> list[str]:
    """Run one command line as a reader would, in `work`; its combined output as lines."""
    argv = shlex.split(command)
    home = work.parent / "home"
    if argv[0] == "melange-sky":
        runner = CliRunner()  # Click 8.1 mixes stderr into .output, as a terminal shows them
        env: dict[str, str | None] = {key: None for key in CLEARED_ENV}
        env.update(HOME=str(home), MELANGE_SKY_HOME=str(home / ".melange-sky"), SKY_RUNTIME_DIR=None)
        result = runner.invoke(main, argv[1:], env=env, prog_name="melange-sky")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.output.splitlines()
    if argv[0] in SHELL_COMMANDS:
        done = subprocess.run(argv, cwd=work, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        return done.stdout.splitlines()
    raise AssertionError(f"`{argv[0]}` cannot run in a console block: show it in a ```bash block instead")


# Outputs of one-command blocks by their command: the README and the quickstart share examples, run once per process.
_RUN: dict[str, list[str]] = {}


def launches(block: Block) -> bool:
    return any(shlex.split(step.command)[:2] == ["melange-sky", "up"] for step in block.steps)


# Blocks that run `up` import SkyPilot (seconds): under pytest-xdist (--dist loadgroup) they share one worker, so it
# is imported once and the README's dry run reuses the quickstart's output.
CASES = [pytest.param(block, id=block.name, marks=[pytest.mark.xdist_group("docs_sky")] if launches(block) else [])
         for block in BLOCKS]


@pytest.mark.parametrize("block", CASES)
def test_console_example_prints_what_the_docs_show(block: Block, session_dir: Path, monkeypatch,
                                                   request) -> None:
    monkeypatch.chdir(session_dir)
    if launches(block):
        # SkyPilot resolves its catalog directory when imported: import it under the session's HOME, seeded with the
        # bundled prices (conftest's sky_catalog_home), so `up --dryrun` validates in this process in a second
        # instead of trying a download and then a child process per offer. The block's own HOME stays unseeded, so
        # melange-sky's catalog says `bundled`, as on a fresh install; the examples leave out the lines that name
        # the catalog SkyPilot validated against.
        request.getfixturevalue("sky_catalog_home")
        importlib.import_module("sky")
    for step in block.steps:
        if len(block.steps) > 1:  # later steps may read what earlier ones wrote: run them all, here
            output = run_step(step.command, session_dir)
        else:
            output = _RUN[step.command] if step.command in _RUN else run_step(step.command, session_dir)
            _RUN[step.command] = output
        actual = normalise(output)
        expected = normalise(step.expected)
        if not matches(expected, actual):
            diff = "\n".join(difflib.unified_diff(expected, actual, "as documented", "as printed now", lineterm=""))
            pytest.fail(f"{block.path.relative_to(REPO)}:{step.line}: `$ {step.command}` printed something else "
                        f"(regenerate the example):\n{diff}")


def test_the_docs_have_console_examples_to_run() -> None:
    """Guards the parser: the quickstart and the README's tour are console blocks, so they are run above."""
    names = {block.path.name for block in BLOCKS}
    assert {"quickstart.md", "README.md"} <= names
    assert sum(len(block.steps) for block in BLOCKS) >= 10


def test_matching_lets_dots_stand_for_any_lines_and_nothing_else() -> None:
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "...", "b"], ["a", "b"])
    assert not matches(["a", "...", "d"], ["a", "b", "c"])
    assert not matches(["a", "b"], ["a", "b", "c"])
    assert normalise(["Solved by highs in 0.01 s (optimal).  "]) == normalise(["Solved by highs in 12.5 s (optimal)."])
    assert normalise(["30 req/s"]) != normalise(["31 req/s"])


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def anchors(path: Path) -> set[str]:
    """The ids MkDocs gives the headings of a page (Python-Markdown's toc slugs), outside code blocks."""
    ids: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match:
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2)).replace("`", "").replace("*", "")
            ids.add(slugify(text, "-"))
    if path.name == "cli.md":  # the hook adds a section per command
        ids |= {"melange-sky", *all_commands()}
    return ids


def links(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            found += [(number, a or b) for a, b in LINK.findall(re.sub(r"`[^`]*`", "", line))]
    return found


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(path.relative_to(REPO)) for path in DOC_FILES])
def test_every_link_lands_on_a_file_and_heading_that_exist(path: Path) -> None:
    broken = []
    for number, target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{path.name}:{number}: {target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{path.name}:{number}: {target}: no heading #{anchor} in {destination.name}")
        elif path.parent == DOCS and not destination.is_relative_to(DOCS):
            broken.append(f"{path.name}:{number}: {target}: outside docs/, so not in the site (name it as `code`)")
    assert broken == []


def nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    assert sorted(listed) == sorted(path.name for path in PAGES)


def test_the_cli_reference_shows_every_registered_command_with_its_help() -> None:
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = hook.on_page_markdown((DOCS / "cli.md").read_text(), None, None, None)
    assert hook.MARKER not in page
    for name, command in all_commands().items():
        assert f"\n## {name}\n" in page, name
        assert f"Usage: melange-sky {name} " in page, name
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and not getattr(param, "hidden", False):
                    assert opt in page, (name, opt)


def test_ci_runs_the_readmes_one_line_test_command_and_it_builds_the_docs_strictly() -> None:
    """.ci/run takes the first line of the code block after the marker: it must be the whole command, and it builds
    the site with --strict somewhere outside the repository (nothing written into the working tree)."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("<!-- ci-test-command -->")
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    command, closing = lines[fence + 1], lines[fence + 2]
    assert closing == "```", "the test command must be one line"
    assert "mkdocs build --strict" in command and "python -m pytest" in command
    site = re.search(r"mkdocs build --strict(?: -q)? -d (\S+)", command)
    assert site is not None and site.group(1) not in ("site", "./site", "docs"), command


def named(key: str, text: str) -> bool:
    return f"`{key}`" in text or f'"{key}"' in text or f".{key}`" in text or f"`{key}:" in text


def test_every_config_key_the_code_accepts_is_named_in_the_reference() -> None:
    """Unknown keys are errors, so a key the code accepts but the docs never name is one users cannot find."""
    def text(*pages: str) -> str:
        return "\n".join((DOCS / page).read_text() for page in pages)

    blocks = {
        "top level": (TOP_LEVEL_KEYS, text("config.md")),
        "gpu_info.<GPU>": (GPU_KEYS, text("config.md")),
        "deployment": (DEPLOYMENT_KEYS, text("config.md", "templates.md", "fleet.md", "estimate.md")),
        "deployment.router": (ROUTER_KEYS, text("fleet.md")),
        "deployment.router.tls": (TLS_KEYS, text("fleet.md")),
    }
    missing = {block: [key for key in keys if not named(key, pages)] for block, (keys, pages) in blocks.items()}
    assert {block: keys for block, keys in missing.items() if keys} == {}


def regenerate(paths: list[Path]) -> list[str]:
    """Rewrite the output under each `$ ` line of the console blocks in `paths` with what the command prints now.
    Blocks whose output leaves lines out (`...`) are not touched: they are listed, to be edited by hand."""
    import os  # noqa: PLC0415 - only this maintenance path changes the process's directory
    import tempfile  # noqa: PLC0415

    by_hand: list[str] = []
    for path in paths:
        lines = path.read_text().splitlines()
        for block in reversed(console_blocks(path)):  # from the end, so earlier line numbers stay valid
            if any("..." in step.expected for step in block.steps):
                by_hand.append(block.name)
                continue
            with tempfile.TemporaryDirectory() as base:
                work = make_session_dir(Path(base))
                here = os.getcwd()
                os.chdir(work)
                try:
                    outputs = [run_step(step.command, work) for step in block.steps]
                finally:
                    os.chdir(here)
            for step, output in reversed(list(zip(block.steps, outputs))):
                if normalise(output) == normalise(step.expected):
                    continue  # only durations differ: keep the printed example as it is
                start = step.line  # the `$ ` line, 1-based: its output follows it
                lines[start:start + len(step.expected)] = [line.rstrip() for line in output]
        path.write_text("\n".join(lines) + "\n")
    return by_hand


if __name__ == "__main__":
    # `python tests/test_docs.py [FILE.md ...]`: regenerate the console examples (all docs and the README by default).
    import sys  # noqa: PLC0415

    chosen = [Path(arg).resolve() for arg in sys.argv[1:]] or DOC_FILES
    for name in regenerate(chosen):
        print(f"{name}: leaves lines out (...): not regenerated, check it with pytest tests/test_docs.py")


REPO_PATH = re.compile(r"`((?:melange_sky|tests|bench|templates|examples|docs)/[A-Za-z0-9_./-]+)`")


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(path.relative_to(REPO)) for path in DOC_FILES])
def test_every_file_the_docs_name_exists(path: Path) -> None:
    """`melange_sky/serve/policy.py`, `tests/fake_backend.py`, `bench/...`: modules move; the docs must follow
    (the extension points name the file each lives in)."""
    text = path.read_text()
    missing = sorted({name for name in REPO_PATH.findall(text) if not (REPO / name.rstrip(".")).exists()})
    assert missing == []
