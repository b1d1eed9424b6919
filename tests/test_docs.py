"""The README and docs/ stay true to the repository: short README, links and cited paths that exist, and every
command in a fenced code block accepted by the parser it names (the recipes' TrlParser or argparse, the
``hydra-rlhf`` CLI). Nothing here trains or loads a model."""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 250

# A repository path: one of these folders, then path characters. Templates (<objective>) are skipped, globs
# must match at least one file.
PATH_PREFIXES = ("hydra_rlhf", "recipes", "benchmarks", "docs", "notebooks", "tests")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*<>{}-]*)" % "|".join(PATH_PREFIXES))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """Markdown without its fenced code blocks."""
    return FENCE.sub("", text)


def cited_paths(text: str) -> list[str]:
    """Repository paths in ``text``, trailing punctuation removed; templates left out."""
    found = []
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".,:;")
        if "<" in path or "{" in path:
            continue
        found.append(path)
    return found


def missing(path: str) -> bool:
    if "*" in path:
        return not glob.glob(str(ROOT / path))
    return not (ROOT / path).exists()


# ------------------------------------------------------------------------------------------------ 1. length


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


def test_docs_exist():
    assert DOCS, "docs/*.md is missing"
    assert (ROOT / "docs" / "design.md").is_file()


# ------------------------------------------------------------------------------------- 2. links and paths


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_point_to_files(page):
    assert broken_links(page) == [], f"{rel(page)} links to files that do not exist"


def code_span_paths(page: Path) -> list[str]:
    """Repository paths cited in inline code (`...`) of a page."""
    return [path for _, code in INLINE_CODE.findall(prose(page.read_text())) for path in cited_paths(code)]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_cited_paths_exist(page):
    assert [p for p in code_span_paths(page) if missing(p)] == [], f"{rel(page)} cites paths that do not exist"


def config_help_texts() -> dict[str, str]:
    from hydra_rlhf.config import HydraModelConfig, ModelConfig, RLConfig
    from hydra_rlhf.sft import SFTConfig

    return {f"{cls.__name__}.{f.name}": f.metadata.get("help", "")
            for cls in (ModelConfig, HydraModelConfig, RLConfig, SFTConfig) for f in dataclasses.fields(cls)}


def module_docstrings() -> dict[str, str]:
    docstrings = {}
    for path in sorted((ROOT / "hydra_rlhf").rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        if docstring:
            docstrings[rel(path)] = docstring
    return docstrings


def test_paths_in_config_help_exist():
    texts = config_help_texts()
    assert texts
    bad = {name: p for name, text in texts.items() for p in cited_paths(text) if missing(p)}
    assert bad == {}, "config help cites paths that do not exist"


def test_paths_in_module_docstrings_exist():
    texts = module_docstrings()
    assert texts
    bad = {name: p for name, text in texts.items() for p in cited_paths(text) if missing(p)}
    assert bad == {}, "module docstrings cite paths that do not exist"


def test_the_checks_catch_a_missing_file(tmp_path, monkeypatch):
    """The link and path checks fail on a page that points at nothing."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("x")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/here.md) [ok](docs/here.md#a) [bad](docs/nowhere.md#a) [web](https://example.com)\n"
                    "`docs/here.md` and `docs/gone.md`, `recipes/configs/<objective>.yaml`\n"
                    "```\n[in a fence](docs/also-nowhere.md)\n```\n")
    assert broken_links(page) == ["docs/nowhere.md#a"]
    assert [p for p in code_span_paths(page) if missing(p)] == ["docs/gone.md"]
    assert cited_paths("see (hydra_rlhf/nothing.py).") == ["hydra_rlhf/nothing.py"]


# --------------------------------------------------------------------------------- 3. no retired file names


def repository_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


def test_no_file_names_retired_design_notes():
    retired = [name + ".md" for name in ("DESIGN", "STYLE")]  # spelled apart so this file does not match itself
    hits = []
    for path in repository_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{rel(path)}: {name}" for name in retired if name in text]
    assert hits == [], "docs/design.md replaces these files; cite it instead"


# ------------------------------------------------------------------------------------ 4. commands parse


def commands(page: Path) -> list[list[str]]:
    """Every command line of the page's fenced code blocks, continuations joined, comments dropped."""
    found = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue  # not a shell line (a table, a tree)
            while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
                tokens = tokens[1:]  # environment assignments
            if tokens:
                found.append(tokens)
    return found


def recipe_call(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(recipe path, its arguments) for ``python recipes/x.py ...``, ``accelerate launch ... recipes/x.py ...`` and
    ``torchrun ... recipes/x.py ...``."""
    runner = tokens[0]
    if runner.endswith(("python", "python3", "torchrun")) or tokens[:2] == ["accelerate", "launch"]:
        for index, token in enumerate(tokens):
            if re.fullmatch(r"recipes/[\w-]+\.py", token):
                return token, tokens[index + 1 :]
    return None


ALL_COMMANDS = [(rel(page), tokens) for page in PAGES for tokens in commands(page)]
RECIPES = [(where, *call) for where, tokens in ALL_COMMANDS if (call := recipe_call(tokens))]
CLI = [(where, tokens[1:]) for where, tokens in ALL_COMMANDS if tokens[0] == "hydra-rlhf"]
SCRIPTS = [(where, token) for where, tokens in ALL_COMMANDS for token in tokens
           if re.fullmatch(r"(benchmarks|recipes|tests)/[\w-]+\.py", token)]


def test_the_docs_hold_commands():
    assert any(recipe == "recipes/ppo.py" for _, recipe, _ in RECIPES)
    assert any(recipe == "recipes/sft.py" for _, recipe, _ in RECIPES)
    assert any(recipe == "recipes/demo.py" for _, recipe, _ in RECIPES)
    assert CLI


@pytest.mark.parametrize("where,script", SCRIPTS, ids=lambda x: x if "/" in x else None)
def test_scripts_in_commands_exist(where, script):
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"


def named_configs(argv: list[str], flags=("--config", "--sft_config", "--ppo_config")) -> list[str]:
    return [argv[i + 1] for i, token in enumerate(argv[:-1]) if token in flags]


def load_recipe(path: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("where,recipe,argv", RECIPES, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_recipe_commands_parse(where, recipe, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert (ROOT / recipe).is_file(), f"{where}: {recipe} does not exist"
    for config in named_configs(argv):
        assert (ROOT / config).is_file(), f"{where}: {config} does not exist"
    if recipe in ("recipes/ppo.py", "recipes/sft.py"):
        from trl import TrlParser

        from hydra_rlhf.config import HydraModelConfig, ModelConfig, RLConfig
        from hydra_rlhf.sft import SFTConfig

        types = (HydraModelConfig, RLConfig) if recipe == "recipes/ppo.py" else (ModelConfig, SFTConfig)
        if "--help" in argv or "-h" in argv:
            with pytest.raises(SystemExit) as exit_:
                TrlParser(types).parse_args_and_config(argv)
            assert exit_.value.code == 0
            return
        configs = TrlParser(types).parse_args_and_config(argv)
        assert [type(c) for c in configs[: len(types)]] == list(types)
    elif recipe == "recipes/demo.py":
        demo = load_recipe(recipe)
        args = demo.parse(argv)
        assert (ROOT / args.sft_config).is_file()
        if args.ppo_config:
            assert (ROOT / args.ppo_config).is_file()
    else:  # a recipe without a parser of its own to call: its --help must name every flag the command passes
        help_text = subprocess.run([sys.executable, recipe, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=300).stdout
        flags = [token.split("=")[0] for token in argv if token.startswith("--")]
        assert [flag for flag in flags if flag not in help_text] == [], f"{where}: {recipe} does not take these"


@pytest.mark.parametrize("where,argv", CLI, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_cli_commands_parse(where, argv, monkeypatch):
    """The subcommand and every flag are accepted; the handler does not run."""
    import hydra_rlhf.errors
    from hydra_rlhf import cli

    ran = []

    def boundary(handler, *args, **kwargs):
        ran.append(handler)
        return 0

    monkeypatch.setattr(hydra_rlhf.errors, "error_boundary", boundary)
    monkeypatch.setattr(cli, "error_boundary", boundary, raising=False)  # if cli imports it at module level
    try:
        assert cli.main(argv) == 0
    except SystemExit as exit_:
        pytest.fail(f"{where}: hydra-rlhf {' '.join(argv)} was refused (exit {exit_.code})")
    assert ran, "main returned before reaching the handler"
