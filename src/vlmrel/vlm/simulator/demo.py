"""The demo images' metadata the stand-in server answers from: the real photos that ship in the
scikit-image and scikit-learn wheels, with hand-written annotations, descriptions and boxes.

This is the server's own knowledge (what a model would have learned); it does not come from
the chains. ``DEMO_SCENES`` is the scene vocabulary these annotations use; a request's schema
(its ``scene`` enum) decides which scenes an answer may take.
"""

from __future__ import annotations

from typing import Any

DEMO_SCENES = ("product", "food", "people", "selfie", "animals", "document", "screenshot", "other")


def _obj(name: str, coarse: str, main: bool, conf: float) -> dict[str, Any]:
    return {"name_free": name, "coarse_type": coarse, "is_main": main, "confidence": conf}


def _ann(
    scene: str, objects: list[dict[str, Any]], person: bool = False, animal: bool = False
) -> dict[str, Any]:
    return {
        "scene": scene,
        "has_person": person,
        "has_animal": animal,
        "is_document": scene == "document",
        "is_screenshot": scene == "screenshot",
        "objects": objects,
    }


# The demo photos shipped in the scikit-image / scikit-learn wheels: hand-written annotations
# and approximate boxes (relative 0-1000 coordinates, [x1, y1, x2, y2]).
BUILTIN: list[dict[str, Any]] = [
    {
        "file": ("skimage", "data/astronaut.png"),
        "description": "An astronaut in an orange suit smiles next to a helmet, a flag and a shuttle model.",
        "annotation": _ann(
            "people",
            [
                _obj("astronaut", "person", True, 0.96),
                _obj("space helmet", "helmet", False, 0.88),
                _obj("space shuttle model", "toy", False, 0.74),
                _obj("american flag", "flag", False, 0.81),
            ],
            person=True,
        ),
        "boxes": {
            "astronaut": [20, 20, 720, 1000],
            "woman": [20, 20, 720, 1000],
            "face": [280, 30, 520, 300],
            "helmet": [540, 660, 1000, 1000],
            "space shuttle": [680, 0, 910, 560],
            "flag": [0, 0, 190, 1000],
        },
    },
    {
        "file": ("skimage", "data/chelsea.png"),
        "description": "A close-up of a tabby cat's face with green eyes.",
        "annotation": _ann("animals", [_obj("tabby cat", "cat", True, 0.97)], animal=True),
        "boxes": {
            "cat": [0, 0, 1000, 1000],
            "cat's nose": [500, 700, 620, 860],
            "left eye": [290, 280, 450, 480],
        },
    },
    {
        "file": ("skimage", "data/coffee.png"),
        "description": "An espresso cup on a red saucer with a spoon, on a wooden table.",
        "annotation": _ann(
            "food",
            [
                _obj("espresso cup", "drink", True, 0.93),
                _obj("red saucer", "dish", False, 0.85),
                _obj("spoon", "cutlery", False, 0.72),
            ],
        ),
        "boxes": {"cup": [300, 30, 700, 570], "saucer": [120, 130, 800, 950], "spoon": [520, 560, 680, 820]},
    },
    {
        "file": ("skimage", "data/rocket.jpg"),
        "description": "A rocket on a launch pad at dusk between lightning towers.",
        "annotation": _ann(
            "other", [_obj("rocket", "vehicle", True, 0.9), _obj("launch tower", "structure", False, 0.7)]
        ),
        "boxes": {"rocket": [440, 280, 540, 960], "tower": [0, 0, 130, 1000]},
    },
    {
        "file": ("skimage", "data/motorcycle_left.png"),
        "description": "A red motorcycle parked in a garage.",
        "annotation": _ann("product", [_obj("red motorcycle", "vehicle", True, 0.94)]),
        "boxes": {"motorcycle": [0, 220, 930, 880]},
    },
    {
        "file": ("skimage", "data/motorcycle_right.png"),
        "description": "A red motorcycle parked in a garage.",
        "annotation": _ann("product", [_obj("red motorcycle", "vehicle", True, 0.94)]),
        "boxes": {"motorcycle": [0, 220, 930, 880]},
    },
    {
        "file": ("skimage", "data/camera.png"),
        "description": "A black and white photo of a man operating a camera on a tripod.",
        "annotation": _ann(
            "people",
            [_obj("cameraman", "person", True, 0.95), _obj("camera on tripod", "camera", False, 0.86)],
            person=True,
        ),
        "boxes": {
            "man": [0, 180, 650, 1000],
            "camera": [500, 290, 700, 520],
            "tripod": [540, 520, 800, 1000],
        },
    },
    {
        "file": ("skimage", "data/page.png"),
        "description": "A scanned page of printed text.",
        "annotation": _ann("document", [_obj("printed page", "document", True, 0.92)]),
        "boxes": {"text": [30, 30, 970, 970]},
    },
    {
        "file": ("skimage", "data/text.png"),
        "description": "Printed and handwritten text on paper.",
        "annotation": _ann("document", [_obj("text sample", "document", True, 0.88)]),
        "boxes": {"text": [20, 60, 980, 940]},
    },
    {
        "file": ("skimage", "data/coins.png"),
        "description": "Old coins on a dark background.",
        "annotation": _ann("product", [_obj("coins", "coin", True, 0.9)]),
        "boxes": {"coins": [40, 40, 960, 960]},
    },
    {
        "file": ("skimage", "data/horse.png"),
        "description": "The silhouette of a horse.",
        "annotation": _ann("animals", [_obj("horse silhouette", "horse", True, 0.8)], animal=True),
        "boxes": {"horse": [60, 40, 960, 960]},
    },
    {
        "file": ("skimage", "data/hubble_deep_field.jpg"),
        "description": "Galaxies in the Hubble deep field.",
        "annotation": _ann("other", [_obj("galaxies", "space", True, 0.85)]),
        "boxes": {"galaxy": [400, 350, 600, 550]},
    },
    {
        "file": ("skimage", "data/moon.png"),
        "description": "A grey close-up of the lunar surface.",
        "annotation": _ann("other", [_obj("moon surface", "space", True, 0.7)]),
        "boxes": {"crater": [350, 350, 650, 650]},
    },
    {
        "file": ("skimage", "data/logo.png"),
        "description": "The scikit-image logo.",
        "annotation": _ann("screenshot", [_obj("logo", "graphic", True, 0.8)]),
        "boxes": {"logo": [50, 50, 950, 950]},
    },
    {
        "file": ("skimage", "data/clock_motion.png"),
        "description": "A wall clock blurred by motion.",
        "annotation": _ann("product", [_obj("clock", "clock", True, 0.75)]),
        "boxes": {"clock": [150, 50, 850, 950]},
    },
    {
        "file": ("sklearn", "datasets/images/china.jpg"),
        "description": "A Chinese pagoda on a hill above a lake.",
        "annotation": _ann(
            "other", [_obj("pagoda", "building", True, 0.9), _obj("trees", "plant", False, 0.7)]
        ),
        "boxes": {
            "pagoda": [100, 60, 560, 1000],
            "temple": [100, 60, 560, 1000],
            "lake": [560, 300, 1000, 700],
        },
    },
    {
        "file": ("sklearn", "datasets/images/flower.jpg"),
        "description": "An orange dahlia flower against dark green leaves.",
        "annotation": _ann("other", [_obj("dahlia", "flower", True, 0.93)]),
        "boxes": {"flower": [260, 200, 700, 840], "dahlia": [260, 200, 700, 840]},
    },
    {
        "file": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
        "description": "A portrait of Grace Hopper in US Navy dress uniform and cap, a US flag behind her.",
        "annotation": _ann(
            "people",
            [
                _obj("naval officer", "person", True, 0.95),
                _obj("american flag", "flag", False, 0.86),
                _obj("eyeglasses", "glasses", False, 0.82),
            ],
            person=True,
        ),
        "boxes": {
            "woman": [30, 30, 1000, 1000],
            "face": [300, 230, 730, 560],
            "cap": [290, 30, 730, 300],
            "glasses": [330, 280, 700, 390],
            "flag": [0, 0, 290, 1000],
        },
    },
]
