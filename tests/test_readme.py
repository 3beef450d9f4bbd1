"""Every command of the README's ```bash blocks runs as written, with the repository's venv.

The test parses the README (so a command added later is tested without touching this file)
and runs each command in a temporary copy of the repository whose ``.venv`` links to this
one's. Long commands run in their dry-run form, decided by the command's shape:

- ``make T``: ``make -n T`` (prints the recipe; ``make`` would reinstall the venv);
- ``snakemake ...``: as written when it already plans only (``-n``, ``--lint``,
  ``--rulegraph``, ``--dag``, ...), otherwise with ``-n``; ``--report FILE`` needs a finished
  run (``tests/test_workflow.py`` builds one), so here the run it reports on is dry-run;
- ``python -m vlmrel.bench NAME ...``: ``--help`` (each benchmark takes minutes; the README's
  flags must exist);
- ``python -m vlmrel.models fetch ...``: ``--dry-run`` (fetching needs internet);
- anything else: as written.

A pipeline into a program that is not installed here (``dot``) runs up to that program.
Commands that use the default ``config/config.yaml`` (a real run's config) get a stand-in
``images.source`` folder holding the demo photos, so their dry run can plan the jobs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from wfutil import REPO

pytestmark = pytest.mark.workflow

PLAN_ONLY = {
    "-n",
    "--dry-run",
    "--dryrun",
    "--lint",
    "--rulegraph",
    "--dag",
    "--filegraph",
    "--summary",
    "--detailed-summary",
    "--list-rules",
    "-l",
    "--list-target-rules",
    "--help",
    "-h",
    "--version",
}
TIMEOUT_S = 300


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: comments dropped, backslash continuations joined."""
    commands: list[str] = []
    for block in re.findall(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = pending + line
            pending = ""
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(shlex.join(tokens).replace(" '|' ", " | ").replace(" '>' ", " > "))
    return commands


def _program(tokens: list[str]) -> str:
    return Path(tokens[0]).name if tokens else ""


def dry_form(command: str) -> tuple[list[list[str]], str | None, str]:
    """``(stages, redirect, how)``: the pipeline stages to run, a ``> file`` target, and a note."""
    tokens = shlex.split(command)
    redirect = None
    if ">" in tokens:
        i = tokens.index(">")
        redirect, tokens = tokens[i + 1], tokens[:i]
    stages: list[list[str]] = [[]]
    for t in tokens:
        if t == "|":
            stages.append([])
        else:
            stages[-1].append(t)
    first = stages[0]
    prog = _program(first)
    how = "as written"
    if prog == "make":
        first.insert(1, "-n")
        how = "make -n"
    elif prog == "snakemake":
        if "--report" in first:
            i = first.index("--report")
            del first[i : i + 2]
            first.insert(1, "-n")
            how = "--report dropped, -n (needs a finished run)"
        elif not PLAN_ONLY & set(first):
            first.insert(1, "-n")
            how = "-n"
    elif prog.startswith("python") and first[1:3] == ["-m", "vlmrel.bench"]:
        first.append("--help")
        how = "--help"
    elif prog.startswith("python") and first[1:4] == ["-m", "vlmrel.models", "fetch"]:
        first.insert(4, "--dry-run")
        how = "fetch --dry-run"
    missing = [i for i, st in enumerate(stages) if i and shutil.which(st[0]) is None]
    if missing:
        absent = stages[missing[0]][0]
        stages = stages[: missing[0]]
        redirect = None
        how += f"; stops before {absent} (not installed here)"
    return stages, redirect, how


def _copy_repo(dest: Path) -> None:
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if rel == ".venv" or rel.startswith(".venv/") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    os.symlink(REPO / ".venv", dest / ".venv")


def _standin_images(copy: Path) -> None:
    """The default config's image folder, filled with the demo photos (a dry run lists its files)."""
    from vlmrel.images import materialize_demo

    source = yaml.safe_load((copy / "config" / "config.yaml").read_text())["images"]["source"]
    folder = copy / source
    if not folder.exists():
        materialize_demo(folder)


def _run(stages: list[list[str]], redirect: str | None, cwd: Path, env: dict) -> tuple[int, str, bytes]:
    procs: list[subprocess.Popen] = []
    prev = None
    for i, st in enumerate(stages):
        last = i == len(stages) - 1
        out = open(cwd / redirect, "wb") if (last and redirect) else subprocess.PIPE  # noqa: SIM115
        p = subprocess.Popen(st, cwd=cwd, env=env, stdin=prev, stdout=out, stderr=subprocess.PIPE)
        if prev is not None:
            prev.close()
        prev = p.stdout
        procs.append(p)
    try:
        stdout, stderr = procs[-1].communicate(timeout=TIMEOUT_S)
        rcs = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = stderr.decode(errors="replace")
    for p in procs[:-1]:
        errs = p.stderr.read().decode(errors="replace") + errs
    return max(rcs, key=abs), errs, stdout or b""


def test_readme_has_commands():
    commands = readme_commands((REPO / "README.md").read_text())
    assert any("snakemake" in c for c in commands)
    # the convention: a target never follows --configfile (it would be read as a config file)
    for c in commands:
        tokens = shlex.split(c)
        if "--configfile" in tokens:
            after = tokens[tokens.index("--configfile") + 1 :]
            assert len(after) == 1 or after[1].startswith("-") or after[1] == "|", c


def test_parse_and_dry_forms():
    text = (
        "x\n```bash\nmake demo   # a comment\n.venv/bin/snakemake -c2 mcdo \\\n  --configfile c.yaml\n```\n"
    )
    assert readme_commands(text) == ["make demo", ".venv/bin/snakemake -c2 mcdo --configfile c.yaml"]
    assert dry_form("make demo")[0] == [["make", "-n", "demo"]]
    assert dry_form(".venv/bin/snakemake -c2 mcdo")[0] == [[".venv/bin/snakemake", "-n", "-c2", "mcdo"]]
    assert dry_form(".venv/bin/snakemake -n")[0] == [[".venv/bin/snakemake", "-n"]]
    assert dry_form(".venv/bin/snakemake --report r.html --configfile c.yaml")[0] == [
        [".venv/bin/snakemake", "-n", "--configfile", "c.yaml"]
    ]
    assert dry_form(".venv/bin/python -m vlmrel.models fetch clip_b32")[0] == [
        [".venv/bin/python", "-m", "vlmrel.models", "fetch", "--dry-run", "clip_b32"]
    ]


def test_readme_commands_run(tmp_path):
    commands = readme_commands((REPO / "README.md").read_text())
    copy = tmp_path / "repo"
    copy.mkdir()
    _copy_repo(copy)
    _standin_images(copy)
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    failures = []
    for command in commands:
        stages, redirect, how = dry_form(command)
        rc, err, out = _run(stages, redirect, copy, env)
        if rc != 0:
            failures.append(
                f"$ {command}\n  ran as: {' | '.join(shlex.join(s) for s in stages)} ({how})\n"
                f"  exit {rc}:\n{err[-3000:]}"
            )
        elif "--rulegraph" in stages[0] and redirect is None:
            assert out.lstrip().startswith(b"digraph"), command
    assert not failures, "\n\n".join(failures)
