"""Static checks of the rule files that neither `snakemake --lint` nor a dry run makes."""

from __future__ import annotations

import re

from wfutil import REPO


def test_every_conda_environment_a_rule_names_exists():
    missing = []
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            if not (smk.parent / env).resolve().is_file():
                missing.append(f"{smk.name}: {env}")
    assert missing == []
    assert sorted(p.name for p in (REPO / "envs").iterdir()) == ["vlmrel.yaml"]
