"""TrialSpec: one record of a pass job's arm and settings, built from a Snakemake job."""

import dataclasses

import pytest
from snakemake.iocontainers import Namedlist

from vlmrel.mcdo.spec import TrialSpec


def _job(wildcards: dict, params: dict) -> tuple[Namedlist, Namedlist]:
    return Namedlist(fromdict=wildcards), Namedlist(fromdict=params)


SETTINGS = {"seed": 7, "T": [8, 2, 4], "precision": "bf16", "batch_size": "16", "device": "cpu"}


def test_from_job_reads_wildcards_and_params_with_their_types():
    w, p = _job(
        {"run": "demo", "exp": "exp0", "model": "tiny_clip", "kind": "output", "p": "0.05", "k": "3"},
        {**SETTINGS, "num_images": 40, "geometry": False},
    )
    spec = TrialSpec.from_job(w, p)
    assert spec == TrialSpec(
        exp="exp0", model="tiny_clip", kind="output", p=0.05, seed=7, T=(2, 4, 8), precision="bf16",
        batch_size=16, device="cpu", k=3, num_images=40,
    )  # fmt: skip
    assert spec.passes == 8 and spec.T == (2, 4, 8) and isinstance(spec.p, float) and spec.k == 3
    assert spec.meta() == {
        "experiment": "exp0",
        "model": "tiny_clip",
        "p": 0.05,
        "seed": 7,
        "trial": 3,
        "kind": "output",
    }
    assert list(spec.meta()) == ["experiment", "model", "p", "seed", "trial", "kind"]  # the files' key order


def test_from_job_without_trial_index_or_images():
    """exp10's text jobs pass no num_images; a job without a {k} wildcard has no trial in its meta."""
    w, p = _job({"exp": "exp10", "model": "tiny_clip", "kind": "output", "p": "0.1"}, SETTINGS)
    spec = TrialSpec.from_job(w, p)
    assert spec.k is None and spec.num_images is None
    assert "trial" not in spec.meta()
    assert dataclasses.replace(spec, k=2).meta()["trial"] == 2


def test_from_job_names_a_missing_setting():
    w, p = _job({"exp": "exp0", "model": "m", "kind": "output", "p": "0.1", "k": "0"}, {"seed": 0})
    with pytest.raises(AttributeError, match="T"):
        TrialSpec.from_job(w, p)
