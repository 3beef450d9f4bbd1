"""The perturbation grid: brightness x contrast (the seeds' presets), blur, noise, named corruptions.

Every perturbation has a stable ``id``, its ``params`` and a ``magnitude``: the seed's L2 norm
``sqrt(brightness^2 + (contrast - 1)^2 + blur^2 + noise^2)`` (notebook 02's
``perturbation_magnitude``); for a named corruption the magnitude is ``severity / 5`` (the
corruption's only number, scaled to (0, 1]; the seeds had none).

Parameters follow the seeds: ``brightness`` is added to PIL's brightness factor (``1 + b``),
``contrast`` is PIL's contrast factor, ``blur`` is the radius of PIL's ``GaussianBlur`` (notebook
03's convention), ``noise`` the standard deviation of additive Gaussian noise as a fraction of 255.
They are applied in that order. Random draws (noise, and every random corruption) come from a
generator seeded by a hash of ``(seed, sample_id, perturbation_id)``, so the result does not depend
on the processing order and a resumed run equals an uninterrupted one (seed defect 5).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import threading
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

PRESETS: dict[str, tuple[list[float], list[float]]] = {
    # notebook 02: 5 x 5 = 25, identity included
    "5x5": ([-0.2, -0.1, 0.0, 0.1, 0.2], [0.8, 0.9, 1.0, 1.1, 1.2]),
    # notebook 03: 10 x 10 = 100, linspace(-0.3, 0.3, 10) x linspace(0.7, 1.3, 10)
    "10x10": (np.linspace(-0.3, 0.3, 10).tolist(), np.linspace(0.7, 1.3, 10).tolist()),
}
ORIGINAL_ID = "original"
CORRUPTIONS_PACKAGE = "imagecorruptions"
# imagecorruptions 1.1.2 calls APIs that scikit-image >= 0.19 and NumPy 2 removed in these three
BROKEN_CORRUPTIONS = {
    "glass_blur": "calls skimage.filters.gaussian(multichannel=...), removed in scikit-image 0.19",
    "gaussian_blur": "calls skimage.filters.gaussian(multichannel=...), removed in scikit-image 0.19",
    "fog": "uses np.float_, removed in NumPy 2.0",
}


@dataclass(frozen=True)
class Perturbation:
    """One grid point: ``family`` (bc, blur, noise, combo, corruption), ``params`` and derived id."""

    family: str
    params: Mapping[str, float | int | str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return perturbation_id(self.family, self.params)

    @property
    def magnitude(self) -> float:
        return perturbation_magnitude(self.params)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "family": self.family,
            "params": dict(self.params),
            "magnitude": self.magnitude,
        }


def _fmt(x: float) -> str:
    return f"{float(x):+.4f}".replace("+", "p").replace("-", "m")


def perturbation_id(family: str, params: Mapping[str, float | int | str]) -> str:
    """A readable, filesystem-safe id with 4 decimals, e.g. ``bc_bm0.2000_cp0.8000``."""
    if family == "corruption":
        return f"corr_{params['corruption']}_s{int(params['severity'])}"
    short = {"brightness": "b", "contrast": "c", "blur": "r", "noise": "n"}
    parts = [
        f"{short[k]}{_fmt(params[k])}" for k in ("brightness", "contrast", "blur", "noise") if k in params
    ]
    return f"{family}_" + "_".join(parts)


def perturbation_magnitude(params: Mapping[str, float | int | str]) -> float:
    """The seed's L2 norm ``sqrt(b^2 + (c-1)^2 + blur^2 + noise^2)``; ``severity / 5`` for a corruption."""
    if "corruption" in params:
        return float(params["severity"]) / 5.0
    b = float(params.get("brightness", 0.0))
    c = float(params.get("contrast", 1.0))
    r = float(params.get("blur", 0.0))
    n = float(params.get("noise", 0.0))
    return math.sqrt(b * b + (c - 1.0) ** 2 + r * r + n * n)


def build_grid(cfg: Mapping) -> list[Perturbation]:
    """The perturbations of a ``grounding.perturbations`` config section, in a fixed order.

    Keys (all optional): ``brightness_contrast`` (a preset name ``5x5``/``10x10`` or
    ``{brightness: [...], contrast: [...]}``; brightness outer, contrast inner, as the seeds),
    ``blur`` (radii), ``noise`` (std as fraction of 255), ``corruptions``
    (``{names: [...], severities: [...]}``). Ids must be unique.
    """
    grid: list[Perturbation] = []
    bc = cfg.get("brightness_contrast")
    if bc is not None:
        if isinstance(bc, str):
            if bc not in PRESETS:
                raise ValueError(
                    f"grounding.perturbations.brightness_contrast: unknown preset {bc!r}; {list(PRESETS)}"
                )
            bs, cs = PRESETS[bc]
        else:
            bs, cs = list(bc["brightness"]), list(bc["contrast"])
        grid += [Perturbation("bc", {"brightness": float(b), "contrast": float(c)}) for b in bs for c in cs]
    for r in cfg.get("blur") or []:
        if float(r) <= 0:
            raise ValueError(f"grounding.perturbations.blur: radius must be > 0, got {r}")
        grid.append(Perturbation("blur", {"blur": float(r)}))
    for s in cfg.get("noise") or []:
        if float(s) <= 0:
            raise ValueError(f"grounding.perturbations.noise: std must be > 0, got {s}")
        grid.append(Perturbation("noise", {"noise": float(s)}))
    corr = cfg.get("corruptions")
    if corr:
        for name in corr.get("names", []):
            for sev in corr.get("severities", [1, 3, 5]):
                if int(sev) not in range(1, 6):
                    raise ValueError(f"grounding.perturbations.corruptions: severity {sev} not in 1..5")
                grid.append(Perturbation("corruption", {"corruption": str(name), "severity": int(sev)}))
    ids = [p.id for p in grid]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"grounding.perturbations: duplicate perturbations {dup}")
    return grid


def derive_seed(seed: int, sample_id: str, perturbation_id: str) -> int:
    """A 63-bit seed from a hash of ``(seed, sample_id, perturbation_id)`` (order-independent draws)."""
    key = json.dumps([int(seed), str(sample_id), str(perturbation_id)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def apply_perturbation(
    image: Image.Image, pert: Perturbation, *, sample_id: str, seed: int = 0
) -> Image.Image:
    """``image`` (RGB) perturbed by ``pert``; random parts seeded from ``(seed, sample_id, pert.id)``."""
    img = image.convert("RGB") if image.mode != "RGB" else image.copy()
    p = pert.params
    if pert.family == "corruption":
        return corrupt(img, str(p["corruption"]), int(p["severity"]), derive_seed(seed, sample_id, pert.id))
    b = float(p.get("brightness", 0.0))
    c = float(p.get("contrast", 1.0))
    r = float(p.get("blur", 0.0))
    n = float(p.get("noise", 0.0))
    if b != 0:
        img = ImageEnhance.Brightness(img).enhance(1.0 + b)
    if c != 1.0:
        img = ImageEnhance.Contrast(img).enhance(c)
    if r > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=r))
    if n > 0:
        rng = np.random.default_rng(derive_seed(seed, sample_id, pert.id))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, n * 255.0, arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img


# ------------------------------------------------------------------------- imagecorruptions

_CORR_LOCK = threading.Lock()


def _pkg_resources_shim() -> types.ModuleType:
    """``pkg_resources.resource_filename`` for imagecorruptions 1.1.2 (setuptools >= 81 dropped it)."""
    mod = types.ModuleType("pkg_resources")

    def resource_filename(name: str, resource: str) -> str:
        m = importlib.import_module(name)
        return os.path.join(os.path.dirname(m.__file__), resource)

    mod.resource_filename = resource_filename  # type: ignore[attr-defined]
    return mod


@functools.cache
def _corruptions_module() -> types.ModuleType:
    """Import imagecorruptions, lending it ``pkg_resources`` only for the import if it is missing."""
    if importlib.util.find_spec(CORRUPTIONS_PACKAGE) is None:
        raise ImportError(
            f"the corruption perturbations need the '{CORRUPTIONS_PACKAGE}' package: "
            f"pip install {CORRUPTIONS_PACKAGE}==1.1.2"
        )
    lent = False
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        sys.modules["pkg_resources"] = _pkg_resources_shim()
        lent = True
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(CORRUPTIONS_PACKAGE)
    except Exception as exc:  # noqa: BLE001 - report any import failure with the package name
        raise ImportError(f"the '{CORRUPTIONS_PACKAGE}' package failed to import: {exc}") from exc
    finally:
        if lent:
            sys.modules.pop("pkg_resources", None)
    return module


def available_corruptions() -> list[str]:
    """Named corruptions that work with the installed imagecorruptions and its dependencies."""
    names = _corruptions_module().get_corruption_names("all")
    return [n for n in names if n not in BROKEN_CORRUPTIONS]


@contextlib.contextmanager
def _forked_numpy_rng(seed: int) -> Iterator[None]:
    """Seed NumPy's legacy global RNG for one call and restore its state after (like torch's fork_rng).

    imagecorruptions draws from ``np.random.*`` and skimage's ``random_noise`` without a seed
    argument; this is the only way to make it deterministic. Serialised by a lock.
    """
    import skimage.util

    with _CORR_LOCK:
        saved = np.random.get_state()  # noqa: NPY002 - saved and restored: a fork, as documented
        original_noise = skimage.util.random_noise
        np.random.set_state(np.random.RandomState(seed % (2**32)).get_state())  # noqa: NPY002
        skimage.util.random_noise = functools.partial(original_noise, rng=seed)
        try:
            yield
        finally:
            skimage.util.random_noise = original_noise
            np.random.set_state(saved)  # noqa: NPY002


def corrupt(image: Image.Image, name: str, severity: int, seed: int) -> Image.Image:
    """Apply imagecorruptions' ``name`` at ``severity`` (1..5), deterministically for ``seed``."""
    module = _corruptions_module()
    names = module.get_corruption_names("all")
    if name not in names:
        raise ValueError(f"unknown corruption {name!r}; {CORRUPTIONS_PACKAGE} offers {names}")
    if name in BROKEN_CORRUPTIONS:
        raise RuntimeError(
            f"corruption {name!r} of {CORRUPTIONS_PACKAGE} does not work with the installed libraries: "
            f"{BROKEN_CORRUPTIONS[name]}; choose one of {available_corruptions()}"
        )
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if min(arr.shape[:2]) < 32:
        raise ValueError(
            f"{CORRUPTIONS_PACKAGE} needs images of at least 32x32 pixels, got {arr.shape[1]}x{arr.shape[0]}"
        )
    with _forked_numpy_rng(seed):
        out = module.corrupt(arr, corruption_name=name, severity=int(severity))
    out = np.asarray(out)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out
    if out.shape[:2] != arr.shape[:2]:  # some corruptions (frost, zoom) can come back a pixel off
        out = np.asarray(Image.fromarray(out).resize((arr.shape[1], arr.shape[0]), Image.BILINEAR))
    return Image.fromarray(out)


def grid_table(grid: Sequence[Perturbation]) -> list[dict]:
    """Rows ``{id, family, params (JSON), magnitude}`` for writing the grid next to the predictions."""
    return [
        {
            "id": p.id,
            "family": p.family,
            "params": json.dumps(dict(p.params), sort_keys=True),
            "magnitude": p.magnitude,
        }
        for p in grid
    ]
