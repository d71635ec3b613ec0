"""README.md and docs/*.md against the tree they describe: the README's test command is the one CI
runs, every docs page is reachable from the README, every relative link and anchor resolves (also in
the loadtest/, deploy/ and studio/ READMEs), and every command they show (`sentiric-llama ...`,
`python -m server ...`, `python loadtest/*.py ...`, `./build_llama.sh ...`) is accepted by that
program's own argument parsing. Nothing runs past the parsing."""

import argparse
import importlib.metadata
import re
import runpy
import shlex
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

pytestmark = pytest.mark.unit

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINKING = [*PAGES, *(ROOT / d / "README.md" for d in ("loadtest", "deploy", "studio"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def text_outside_fences(text: str) -> str:
    return FENCE.sub("", text)


def shell_commands(page) -> list[str]:
    """Command lines of the page's sh/bash blocks (continuations joined) and of its inline code."""
    text = page.read_text()
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in ("sh", "bash"):
            lines += body.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`]+)`", text_outside_fences(text).replace("\n", " "))
    commands = []
    for line in lines:
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True) if part.strip() else []
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before a command
                words.pop(0)
            if words and words[-1] == "&":
                words.pop()
            if words and (words[0] in ("sentiric-llama", "./build_llama.sh")
                          or words[0] in ("python", "python3") and len(words) > 1
                          and (words[1].startswith("loadtest/") or words[1:3] == ["-m", "server"])):
                commands.append(shlex.join(words))
    return commands


COMMANDS = sorted({(page.relative_to(ROOT).as_posix(), command) for page in PAGES for command in shell_commands(page)})


class Parsed(Exception):
    """Raised instead of running a program once its arguments are parsed."""

    def __init__(self, extras):
        self.extras = extras


@pytest.fixture
def parse_only(monkeypatch):
    """Any argparse parser stops the program right after parsing, unless it only passes arguments on
    (`sentiric-llama serve|client`, parsers without -h)."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)
        chosen = [action.choices.get(getattr(namespace, action.dest, None)) for action in self._actions
                  if isinstance(action, argparse._SubParsersAction)]
        if not self.add_help or any(sub is not None and not sub.add_help for sub in chosen):
            return namespace, extras
        raise Parsed(extras)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)


def run_parsing(words: list[str], monkeypatch) -> list[str]:
    """The arguments the program left unparsed ([] when it accepted every one)."""
    if words[0] == "./build_llama.sh":
        usage = subprocess.run(["./build_llama.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=30).stdout
        options = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage))
        return [w for w in words[1:w_end(words)] if w.startswith("-") and w not in options]
    if words[0] == "sentiric-llama":
        program = importlib.metadata.entry_points(group="console_scripts", name="sentiric-llama")
        main = next(iter(program)).load()
        monkeypatch.setattr(sys, "argv", words)
        call = main
    elif words[1] == "-m":
        monkeypatch.setattr(sys, "argv", ["server", *words[3:]])
        call = lambda: runpy.run_module("server", run_name="__main__")  # noqa: E731
    else:
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        monkeypatch.setattr(sys, "argv", [str(script), *words[2:]])
        call = lambda: runpy.run_path(str(script), run_name="__main__")  # noqa: E731
    try:
        call()
    except Parsed as parsed:
        return parsed.extras
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"its argument parsing refused it (exit {exit_.code})"
        return []
    raise AssertionError("the program ran past its argument parsing")


def w_end(words: list[str]) -> int:
    """Where build_llama.sh's own options end (`--` passes the rest to CMake)."""
    return words.index("--") if "--" in words else len(words)


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c}"[:90] for p, c in COMMANDS])
def test_every_command_shown_is_accepted(page, command, parse_only, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    unparsed = run_parsing(shlex.split(command), monkeypatch)
    assert unparsed == [], f"{page}: `{command}`: not accepted: {unparsed}"


def test_there_are_commands_to_check():
    programs = {c.split()[0] if not c.startswith("python") else " ".join(c.split()[:2]) for _, c in COMMANDS}
    assert {"sentiric-llama", "./build_llama.sh", "python loadtest/bench_serving.py"} <= programs


def test_the_readme_shows_the_command_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "python3 -m pytest" in ci_command and ci_command in README.read_text()
    assert "bash .ci/setup.sh && sentiric-llama serve" in README.read_text()


def test_the_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 300


def test_the_readme_names_the_registered_markers():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {m.split(":")[0] for m in config["markers"]}
    listed = set(re.findall(r"^\| `(\w+)` \|", README.read_text(), re.M)) & registered
    assert listed == registered and "--strict-markers" in config["addopts"]


def heading_anchors(page) -> set[str]:
    """GitHub's anchors for the page's headings."""
    headings = re.findall(r"^#+ (.+)$", text_outside_fences(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", LINKING, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(text_outside_fences(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(target)
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []
