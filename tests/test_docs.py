"""The docs as a reader meets them: the README stays a short front door whose quick tour runs as written, and the
docs site under `docs/` builds with no warning, so no page points at a page, an anchor or a file that is not there."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import FAST, cli_env, console

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TOUR = "Quick tour"
# The tour made short, appended to each of its commands: the toy default trained for 4 steps on 8 prompts (FAST
# without its model: the tour trains the default toy), evaluated on 6 prompts without CLIP weights (none offline).
SHORT = {
    "fraqat-train": FAST[1:],
    "fraqat-eval": ["prompts.count=6", "batch_size=6", "logger=csv", "clip.model=null"],
    "fraqat-export": [],
}
# Appended to the tour's Python: the README says the student loads in a process that never imports fraqat.
NO_FRAQAT = "\nimport sys\nassert not [m for m in sys.modules if m.split('.')[0] == 'fraqat_cli'], 'imported fraqat'\n"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def section(text: str, title: str) -> str:
    """The part of a markdown text from the `## <title>...` heading to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(0)


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```<language> blocks of a markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def tour_commands() -> list[list[str]]:
    """Each command line of the tour's bash blocks, split as a shell would (comments dropped)."""
    lines = "\n".join(fenced(section(README.read_text(), TOUR), "bash")).splitlines()
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def test_the_readme_is_a_front_door_that_names_both_test_tiers():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    two_commands = section(text, "Two commands")
    assert "make test " in two_commands and "make test-all" in two_commands


def test_every_readme_link_reaches_a_file_and_every_docs_page_is_linked():
    text = README.read_text()
    targets = {t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t}
    assert [t for t in sorted(targets) if not (ROOT / t).exists()] == []
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")} | {"docs/results/index.md"}
    assert sorted(pages - targets) == []


def test_the_tour_runs_the_console_scripts_from_training_on():
    commands = tour_commands()
    assert commands[0][0] == "fraqat-train"
    assert {words[0] for words in commands} <= set(SHORT), commands


@pytest.mark.slow
def test_the_quick_tour_runs_as_written(tmp_path, cache_dir):
    """Every command of the README's tour, in order, in one folder, with fewer steps and prompts; then its Python,
    in a fresh interpreter, loads the exports in diffusers."""
    for words in tour_commands():
        result = console(words[0], [*words[1:], *SHORT[words[0]]], cwd=tmp_path, cache_dir=cache_dir)
        assert result.returncode == 0, (words, result.stderr[-3000:])
    export = tmp_path / "runs" / "default" / "export"
    assert (export / "student.safetensors").is_file() and (export / "student.gguf").is_file()
    assert (export / "diffusers" / "model_index.json").is_file()
    for code in fenced(section(README.read_text(), TOUR), "python"):
        result = subprocess.run([sys.executable, "-c", code + NO_FRAQAT], cwd=tmp_path, env=cli_env(cache_dir),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]


def build_site(config: Path, site: Path) -> tuple[int, list[str], str]:
    """`mkdocs build --strict` as `make docs` runs it: its exit status, its WARNING/ERROR lines, its whole output
    (a warning may go on over the lines below it)."""
    command = [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-f", str(config), "-d", str(site)]
    result = subprocess.run(command, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
                            capture_output=True, text=True, timeout=300)
    output = ANSI.sub("", result.stdout + result.stderr)
    return result.returncode, [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)], output


def test_the_docs_site_builds_with_no_warning(tmp_path):
    status, warnings, _ = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert (status, warnings) == (0, [])
    assert (tmp_path / "site" / "results" / "families" / "index.html").is_file()


def test_a_broken_link_a_missing_anchor_or_a_page_outside_the_nav_fails_the_build(tmp_path):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\n[gone](nowhere.md) and [no such part](training.md#no-such-part)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# A page no menu reaches\n")
    status, warnings, output = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert status != 0 and len(warnings) >= 3, output
    for name in ("nowhere.md", "#no-such-part", "orphan.md"):
        assert name in output.partition("WARNING")[2], (name, output)


def longest_module(parts: list[str]):
    """(length, module) of the longest importable prefix of `parts`."""
    import importlib

    for length in range(len(parts), 0, -1):
        try:
            return length, importlib.import_module(".".join(parts[:length]))
        except ImportError:
            continue
    raise ImportError(".".join(parts))


def test_every_dotted_fraqat_name_in_the_docs_exists():
    """`fraqat_cli.quant.schedules.SmoothSchedule` and the like, as README.md and docs/ name them, import: a module
    that moved leaves no stale name for a reader to paste."""
    stale = []
    for page in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for name in sorted(set(re.findall(r"fraqat_cli(?:\.\w+)+", page.read_text()))):
            parts = name.split(".")
            found, thing = longest_module(parts)
            for attribute in parts[found:]:
                thing = getattr(thing, attribute, None)
            if thing is None:
                stale.append(f"{page.relative_to(ROOT)}: {name}")
    assert not stale, stale
