"""The documentation cannot drift from the code: README.md and docs/ are checked against the CLI, Config, the
committed results they quote, the files they link, and configs/*.yaml against the defaults."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from fastdqn.bench import SUITES
from fastdqn.cli import build_parser
from fastdqn.config import FIELDS, Config, from_dict, load_yaml
from fastdqn.presets import ATARI
from fastdqn.profiling import RANGES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_LIMIT = 12 * 1024  # bytes: README says what fastdqn is and how to start; the rest lives in docs/


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_config():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == load_generator().with_config_table(page), (
        "docs/configuration.md's table of keys differs from fastdqn.config.Config: run python docs/generate.py"
    )


def test_configuration_reference_names_every_field():
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in FIELDS if f"| `{name}` |" not in page]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT, (
        f"README.md is {len(readme.encode())} bytes, over {README_LIMIT}: move detail into docs/"
    )
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", readme))
    pages = {page_id(p) for p in (ROOT / "docs").glob("*.md")} - {
        "docs/ablation-cartpole.md",
        "docs/ablation-extensions.md",
        "docs/cartpole-stability.md",
    }
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"


def source_text(ref: str) -> str:
    """The text a quoted block comes from: a file, or a string inside a JSON file (`PATH#key.key`)."""
    path, _, keys = ref.partition("#")
    text = (ROOT / path).read_text()
    if not keys:
        return text
    value = json.loads(text)
    for key in keys.split("."):
        value = value[key]
    assert isinstance(value, str), f"{ref} is not a string"
    return value


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_quoted_tables_are_in_the_committed_files_they_come_from(page):
    """A block between `<!-- quoted: PATH[#key] -->` markers is copied verbatim from that file or JSON string, so
    its figures are the ones the script wrote."""
    text = page.read_text()
    opened = len(re.findall(r"^<!-- quoted: ", text, re.M))
    quoted = re.findall(r"^<!-- quoted: (\S+) -->\n(.*?)\n<!-- /quoted -->", text, re.S | re.M)
    assert len(quoted) == opened, f"{page_id(page)}: a quoted block lacks its closing marker"
    for ref, block in quoted:
        assert block.strip() in source_text(ref), f"{page_id(page)}: the block quoted from {ref} differs from it"


def test_sweep_figures_in_the_prose_are_the_committed_sweeps():
    """The wall times, pruned runs and busy shares in docs/results.md come from benchmarks/results/sweep_ray.json."""
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    record = json.loads((ROOT / "benchmarks" / "results" / "sweep_ray.json").read_text())
    local, ray = record["local"], record["ray"]
    assert f"{local['sweep_wall_time_s']:.0f} s with the local backend, {ray['sweep_wall_time_s']:.0f} s on Ray" in text
    assert f"plus {ray['cluster_start_s']:.0f} s to start the cluster" in text
    assert f"stopped {ray['pruned']} of the {ray['trials']} runs on Ray ({local['pruned']} with the local" in text
    assert f"({local['run_time_sum_s']:,.0f} s against {ray['run_time_sum_s']:,.0f} s of training" in text
    assert f"busy {round(100 * local['busy'])}% of the time" in text and round(100 * ray["busy"]) == round(
        100 * local["busy"]
    )


def test_atari_page_lists_the_atari_preset():
    """docs/atari.md names every key of presets.ATARI with its value, as YAML would write it."""
    page = (ROOT / "docs" / "atari.md").read_text()
    for key, value in ATARI.items():
        assert f"`{key}: {yaml.safe_dump(value).splitlines()[0]}`" in page, f"docs/atari.md: preset key {key}"


def test_performance_page_names_every_profiler_range_and_bench_suite():
    page = (ROOT / "docs" / "performance.md").read_text()
    missing = [name for name in [*RANGES, *SUITES] if f"`{name}`" not in page]
    assert not missing, f"docs/performance.md does not name {missing} (profiler ranges, fastdqn bench suites)"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_repository_paths_exist(page):
    """Every relative link resolves, and every repository path named in code spans (benchmarks/, docs/, configs/,
    fastdqn/, tests/) exists."""
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page_id(page)} links to missing {target}"
    for path in re.findall(r"`((?:benchmarks|docs|configs|fastdqn|tests)/[\w./-]+)`", text):
        if "*" in path:
            assert list(ROOT.glob(path)), f"{page_id(page)} names {path}, which matches nothing"
        else:
            assert (ROOT / path.rstrip("/")).exists(), f"{page_id(page)} names missing {path}"


def subcommand_options() -> dict[str, set[str]]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    top = {s for a in parser._actions for s in a.option_strings}
    return {name: top | {s for a in sub._actions for s in a.option_strings} for name, sub in subparsers.choices.items()}


def commands_in(text: str) -> list[str]:
    """`fastdqn ...` command lines in the page: in code blocks (continuation lines joined) and in code spans."""
    commands = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|\|", line):
                if part.strip().startswith("fastdqn "):
                    commands.append(part.strip())
    commands += [span for span in re.findall(r"`(fastdqn [^`]+)`", text)]
    return commands


def command_problems(text: str) -> list[str]:
    """What is wrong with the `fastdqn ...` commands in `text`: unknown subcommands, flags or --set keys."""
    options, problems = subcommand_options(), []
    for command in commands_in(text):
        words = [w for w in shlex.split(command.replace("<", "").replace(">", ""))[1:] if w != "--debug"]
        if not words or words[0].startswith("-"):
            continue
        sub = words[0]
        if sub not in options:
            problems.append(f"`{command}`: fastdqn has no subcommand {sub!r}")
            continue
        for previous, word in zip(words, words[1:]):
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in options[sub]:
                problems.append(f"`{command}`: fastdqn {sub} has no flag {flag}")
            if previous == "--set" and flag not in FIELDS:
                problems.append(f"`{command}`: --set of unknown config key {flag}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_shown_use_real_subcommands_and_flags(page):
    problems = command_problems(page.read_text())
    assert not problems, f"{page_id(page)}: {problems}"


def test_the_command_check_catches_what_it_should():
    text = (
        "```bash\nfastdqn train --envs 4 \\\n    --no-such-flag  # c\n```\n"
        "`fastdqn evaluate RUN`, `fastdqn train --set lr=1`\n"
    )
    assert commands_in(text) == [
        "fastdqn train --envs 4      --no-such-flag",
        "fastdqn evaluate RUN",
        "fastdqn train --set lr=1",
    ]
    assert command_problems(text) == [
        "`fastdqn train --envs 4      --no-such-flag`: fastdqn train has no flag --no-such-flag",
        "`fastdqn evaluate RUN`: fastdqn has no subcommand 'evaluate'",
        "`fastdqn train --set lr=1`: --set of unknown config key lr",
    ]
    assert command_problems("`fastdqn train --set learning_rate=1 --compile --no-amp`") == []


SKIPPED_DIRS = {"__pycache__", "runs", "build", "dist"}  # what .gitignore leaves out, besides hidden dirs


def project_files() -> list[str]:
    """The project's files relative to ROOT, as git would list them, also in a copy without .git (CI's tree)."""
    return [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*")
        if not any(
            part.startswith(".") or part in SKIPPED_DIRS or part.endswith(".egg-info")
            for part in p.relative_to(ROOT).parts
        )
    ]


UPWARD_PATH = re.compile(r"(?<![\w./])(?:\.\./)+[\w.-][\w./-]*")  # a relative path that starts by going up


def test_nothing_refers_to_documents_outside_the_repository():
    """The project stands alone: no relative path in code, tests or docs climbs out of the repository (a user
    has only the repository); a pitfall or an origin is said in place."""
    hits = []
    for name in project_files():
        path = ROOT / name
        if not path.is_file() or path.suffix not in {".py", ".md", ".yaml", ".toml", ".txt", ".sh", ""}:
            continue
        for ref in UPWARD_PATH.findall(path.read_text(errors="replace")):
            if not (path.parent / ref).resolve().is_relative_to(ROOT.resolve()):
                hits.append(f"{name}: {ref}")
    assert not hits, f"paths that leave the repository: {hits}"


def test_cartpole_yaml_is_the_default_config():
    """`fastdqn train` (the defaults) and `--config configs/cartpole.yaml` must be the same run."""
    values = load_yaml(ROOT / "configs" / "cartpole.yaml")
    assert len(values) >= len(FIELDS) // 2, "configs/cartpole.yaml should spell out the recipe's keys"
    assert from_dict(values) == Config(), "configs/cartpole.yaml and the Config defaults disagree"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = from_dict(load_yaml(path), where=str(path))
    assert cfg.total_steps > 0
