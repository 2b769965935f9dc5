"""The docs stay true where a test can tell cheaply: every `foldserve` command in README.md's bash blocks names a
subcommand and flags the CLI has, every page the README links exists, and docs/configuration.md is what
``server/settings.py`` says (every flag of ``foldserve serve --help`` in it)."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from cli.main import build_parser

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _commands(markdown: str) -> list[list[str]]:
    """Every `foldserve ...` command line of the fenced bash blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        joined = re.sub(r"\\\s*(#[^\n]*)?\n", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if "foldserve " not in line:
                continue                                    # curl and the like (a body may span lines)
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w.endswith("foldserve") and "/" not in w.replace(".venv/bin/", ""):
                    out.append(words[i + 1:])
                    break
    return out


def test_every_readme_command_names_a_subcommand_and_flags_the_cli_has():
    parsers = _parsers()
    commands = _commands(README)
    assert len(commands) >= 5, commands
    for words in commands:
        global_flags = []
        while words and words[0].startswith("--"):              # foldserve --log-level X COMMAND
            global_flags.append(words.pop(0))
            words.pop(0)
        assert words and words[0] in parsers, f"unknown subcommand in {words}"
        known = {s for a in parsers[words[0]]._actions for s in a.option_strings}
        flags = [w.split("=", 1)[0] for w in words[1:] if w.startswith("--")]
        assert set(flags) <= known, f"foldserve {words[0]}: {sorted(set(flags) - known)} are not flags of it"


def test_every_page_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, missing


def test_the_readme_stays_a_guide():
    assert len(README.splitlines()) <= 200
    assert "make serve" in README and "make test" in README


def test_configuration_page_is_the_settings_and_names_every_serve_flag():
    from cli.serve import configuration_markdown

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == configuration_markdown(), "docs/configuration.md is stale: run `make docs`"
    serve = _parsers()["serve"]
    flags = {s for a in serve._actions if a.help != argparse.SUPPRESS
             for s in a.option_strings if s.startswith("--") and s != "--help"}
    missing = [f for f in sorted(flags) if f"`{f}`" not in page and not f.startswith("--no-")]
    assert not missing, missing


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_pages_link_only_to_what_exists(page):
    text = (ROOT / "docs" / page).read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / "docs" / link).exists() or (ROOT / link).exists(), (page, link)


def test_one_name_per_concept_with_the_old_spellings_kept_hidden():
    """A server address is --url and a bearer token --auth-token on every command (verify said --server, infer and
    verify --token); serve takes Triton's --model-repository too. The old spellings still parse, unlisted."""
    parsers = _parsers()
    verify = parsers["verify"].parse_args(["e", "--url", "h:1", "--auth-token", "t"])
    assert (verify.server, verify.token) == ("h:1", "t")
    old = parsers["verify"].parse_args(["e", "--server", "h:1", "--token", "t"])
    assert (old.server, old.token) == ("h:1", "t")
    assert parsers["infer"].parse_args(["--model", "m", "--auth-token", "t"]).token == "t"
    assert parsers["serve"].parse_args(["--model-repository", "repo"]).repository == "repo"
    for name in ("verify", "infer", "serve"):
        text = parsers[name].format_help()
        assert "--server" not in text and "--token " not in text and "--model-repository" not in text, name


def test_help_is_grouped_with_defaults_and_every_flag_says_what_it_is():
    """serve --help was 151 lines of 40 flags in one group without defaults; train --help showed no defaults;
    pipeline --help had no descriptions and no --data."""
    from cli.serve import GROUPS

    parsers = _parsers()
    serve = parsers["serve"]
    titles = [g.title for g in serve._action_groups]
    assert all(t in titles for t in GROUPS)
    ungrouped = [a.option_strings for g in serve._action_groups if g.title not in GROUPS for a in g._group_actions
                 if a.help != argparse.SUPPRESS and a.option_strings != ["-h", "--help"]]
    assert not ungrouped, ungrouped
    text = serve.format_help()
    assert "(default: 8000)" in text and "(default: 1048576)" in text
    assert "(default: 30)" in parsers["train"].format_help()
    for name in ("train", "pipeline"):
        silent = [a.option_strings for a in parsers[name]._actions if not a.help]
        assert not silent, (name, silent)
    assert "--data" in parsers["pipeline"].format_help()


def test_the_docs_and_the_help_agree_on_what_bench_quick_costs():
    """The README said "under a minute", the help "under 5 minutes" (it takes about 3)."""
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    said = re.search(r"bench --quick\s+# (about \d+ minutes)", page)
    assert said and said.group(1) in _parsers()["bench"].format_help()
