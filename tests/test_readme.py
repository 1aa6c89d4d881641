"""The README works as written: its Python quick start runs verbatim, every `locosnn` subcommand it
names exists, every relative link points to a file, and its results table is the generated one.
Also the package's public API: every name in ``locosnn.__all__`` imports and is documented."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|console|sh)\n(.*?)^```", text, flags=re.S | re.M)


# -- the Python quick start -----------------------------------------------------------------------------
def test_python_quick_start_runs_verbatim(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(readme())
    assert blocks, "README.md has no ```python block (the Python quick start)"
    quick = blocks[0]
    assert "Trainer(" in quick and "TrainConfig(" in quick, "the first python block is not the quick start"
    assert len(quick.strip().splitlines()) <= 15, "the Python quick start should stay under 15 lines"
    monkeypatch.chdir(tmp_path)  # a run directory, if the block writes one, lands here
    namespace: dict = {"__name__": "__main__"}
    exec(compile(quick, "README.md (python quick start)", "exec"), namespace)
    history = namespace.get("history")
    assert isinstance(history, list) and history and "test_acc" in history[-1]
    assert history[-1]["test_acc"] > 0.5, "the quick start should learn the digits well above chance"
    assert "test accuracy" in capsys.readouterr().out


# -- the command line it names ----------------------------------------------------------------------------
def readme_subcommands(text: str) -> set[str]:
    """Every `locosnn WORD` in the README's code (blocks and inline), WORD a subcommand-looking token."""
    code = "\n".join(shell_blocks(text)) + "\n" + "\n".join(re.findall(r"`([^`\n]+)`", text))
    return set(re.findall(r"(?:^|[\s/`(=])locosnn (?!\[)([a-z][a-z-]*)\b", code, flags=re.M))


def test_readme_names_the_main_subcommands():
    cmds = readme_subcommands(readme())
    assert {"train", "eval", "continual", "bench", "report", "export"} <= cmds, cmds


@pytest.mark.parametrize("cmd", sorted(readme_subcommands(readme())))
def test_every_subcommand_in_the_readme_exists(cmd, capsys):
    """`locosnn CMD --help` exits 0 (run in-process: the same parser as the console script)."""
    from locosnn.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    out = capsys.readouterr()
    assert exit_.value.code in (0, None), f"`locosnn {cmd} --help` exited {exit_.value.code}: {out.err[-500:]}"
    assert f"usage: locosnn {cmd}" in out.out


def test_the_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "locosnn.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and "usage: locosnn" in r.stdout, r.stderr[-500:]


def test_make_targets_named_in_the_readme_exist():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"`?make ([a-z][a-z-]*)", readme()))
    assert named, "the README names no make target"
    assert named <= targets, f"make targets named in the README but missing from the Makefile: {named - targets}"
    assert {"setup", "test", "train", "results"} <= named


# -- links ------------------------------------------------------------------------------------------------
def relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [l for l in links if not re.match(r"[a-z]+:", l) and not l.startswith("#")]


def test_every_relative_link_points_to_a_file():
    links = relative_links(readme())
    assert "RESULTS.md" in links and any(l.endswith(".png") for l in links)
    missing = [l for l in links if not (ROOT / l.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.parametrize("doc", ["RESULTS.md", "docs/rules.md", "docs/history.md"])
def test_generated_and_moved_docs_link_to_existing_files(doc):
    path = ROOT / doc
    assert path.exists(), f"{doc} is missing"
    missing = [l for l in relative_links(path.read_text(encoding="utf-8"))
               if not (path.parent / l.split("#")[0]).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


# -- the generated results ----------------------------------------------------------------------------------
def test_results_md_says_how_it_is_regenerated():
    text = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:8])
    assert "make results" in head and "locosnn report" in head and "commit" in head


def test_readme_table_is_the_generated_one(tmp_path, monkeypatch):
    """The table between the markers is exactly what `make results` writes from results.csv."""
    pytest.importorskip("pandas")
    monkeypatch.chdir(ROOT)  # the caption names the Makefile target, read from the current directory
    from locosnn.report import TABLE_BEGIN, TABLE_END, load_results, report_command, update_readme_table

    text = readme()
    assert text.count(TABLE_BEGIN) == 1 and text.count(TABLE_END) == 1
    dirs = ["benchmarks/sweep", "benchmarks/g2p"]  # the sources `make results` reads, named as it names them
    df, sources = load_results([ROOT / d for d in dirs])
    sources = [dataclasses.replace(s, path=Path(d)) for s, d in zip(sources, dirs)]
    copy = tmp_path / "README.md"
    copy.write_text(text, encoding="utf-8")
    cmd = report_command(dirs, "benchmarks/report", results_md="RESULTS.md", readme_table="README.md")
    update_readme_table(copy, df, sources, cmd)
    fresh = copy.read_text(encoding="utf-8")
    block = lambda t: t[t.index(TABLE_BEGIN):t.index(TABLE_END)]  # noqa: E731
    assert block(fresh) == block(text), "README's results table is stale or hand-edited: run `make results`"
    for rule in ("bptt", "np", "loco", "fa", "dfa", "opzo", "sfdfa", "sal"):
        assert f"`{rule}`" in block(text)


# -- the public API ----------------------------------------------------------------------------------------
import locosnn  # noqa: E402

#: public names whose docstring lives in a file this test's authors do not own; tracked, not hidden
KNOWN_UNDOCUMENTED: dict[str, str] = {}
CONSTANTS = {"RULES", "DATASETS", "__version__"}


def test_all_is_sorted_into_the_package_docstring():
    assert locosnn.__doc__ and "__all__" in locosnn.__doc__
    for name in CONSTANTS:
        assert name in locosnn.__all__
        assert f"``{name}``" in locosnn.__doc__, f"{name} is not described in the package docstring"


def _params():
    for name in locosnn.__all__:
        if name in CONSTANTS:
            continue
        marks = [pytest.mark.xfail(reason=KNOWN_UNDOCUMENTED[name], strict=False)] if name in KNOWN_UNDOCUMENTED else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_public_name_imports_and_has_a_docstring(name):
    obj = getattr(locosnn, name)
    assert obj is getattr(importlib.import_module(obj.__module__), name)
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    generated = inspect.isclass(obj) and doc is not None and doc.startswith(f"{name}(")  # dataclass signature
    assert doc and doc.strip() and not generated, f"locosnn.{name} has no docstring"


def test_every_public_name_imports_from_the_package():
    ns: dict = {}
    exec("from locosnn import *", ns)
    assert set(locosnn.__all__) - {"__version__"} <= set(ns)
    assert isinstance(locosnn.__version__, str) and locosnn.__version__[0].isdigit()
    assert set(locosnn.RULES) >= {"bptt", "np", "loco", "fa", "dfa", "opzo", "sfdfa", "sal", "owm"}


def test_import_is_light():
    """``import locosnn`` loads the model only: the trainer, rules, data and report come on first use."""
    code = ("import sys, locosnn; heavy = [m for m in ('locosnn.train', 'locosnn.report', 'locosnn.continual', "
            "'locosnn.sweep', 'pandas', 'matplotlib', 'yaml') if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"import locosnn pulled in {r.stdout.strip()}"
