"""What every MC-dropout job shares: one record instead of ten keyword parameters.

A trial-like job (``pipeline.trial``, ``pipeline.text_trial``, ``pipeline.rate_search`` and
``semantic.semantic_trial``) runs stochastic passes of one model under one dropout arm. The
arm comes from the job's wildcards (experiment, model, kind, rate, trial index) and the passes'
settings from the rule's params (seed, T list, precision, batch size, number of images, device).
:meth:`TrialSpec.from_job` builds the record from the two, so the rules stay the only place where
config values reach a job (through ``params:``, where Snakemake's rerun triggers see them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrialSpec:
    """One job's dropout arm and pass settings.

    ``k`` is the trial index (``None`` where a job spans all trials: the rate search);
    ``num_images`` limits the job to the file's first images (``None``: all of them; text-tower
    jobs have no images). ``T`` is the sorted list of pass counts at which traces are taken; a
    job makes ``max(T)`` passes.
    """

    exp: str
    model: str
    kind: str
    p: float
    seed: int
    T: tuple[int, ...]
    precision: str
    batch_size: int
    device: str
    k: int | None = None
    num_images: int | None = None

    def __post_init__(self) -> None:  # types as the rules' params and wildcards may not have them
        object.__setattr__(self, "T", tuple(sorted(int(t) for t in self.T)))
        object.__setattr__(self, "p", float(self.p))
        object.__setattr__(self, "batch_size", int(self.batch_size))
        if self.k is not None:
            object.__setattr__(self, "k", int(self.k))

    @property
    def passes(self) -> int:
        """The number of stochastic passes a job makes: max(T)."""
        return self.T[-1]

    def meta(self) -> dict[str, Any]:
        """The arm as the ``meta`` of the job's output file (``trial`` only where there is one)."""
        out: dict[str, Any] = {"experiment": self.exp, "model": self.model, "p": self.p, "seed": self.seed}
        if self.k is not None:
            out["trial"] = self.k
        out["kind"] = self.kind
        return out

    @classmethod
    def from_job(cls, wildcards: Any, params: Any) -> TrialSpec:
        """The spec of a Snakemake job: the arm from its wildcards (``exp``, ``model``, ``kind``,
        ``p``, and ``k`` where the output has one), the settings from its params (``seed``, ``T``,
        ``precision``, ``batch_size``, ``device``, and ``num_images`` where the rule passes it)."""
        k = getattr(wildcards, "k", None)
        return cls(
            exp=wildcards.exp,
            model=wildcards.model,
            kind=wildcards.kind,
            p=float(wildcards.p),
            seed=params.seed,
            T=params.T,
            precision=params.precision,
            batch_size=params.batch_size,
            device=params.device,
            k=k,
            num_images=getattr(params, "num_images", None),
        )
