"""The synthetic character world: procedural (reference, standard) pairs with exact ground truth.

numpy + Pillow only (the torch datasets live in ``trainer.synthetic.dataset``).
"""

from .character import (
    Character,
    appearance_combinations,
    character_ids,
    make_character,
    split_of,
)
from .figure import BODY_LABELS, EXPRESSIONS, LABELS
from .render import (
    FRAMINGS,
    GroupSample,
    Sample,
    SceneSpec,
    reference_on_canvas,
    render_group,
    render_sample,
    render_standard,
    on_photo,
    sample_scene,
    without_person,
)
from .scenes import SCENES
from .skeleton import POSE_FAMILIES, VIEWS

__all__ = [
    "BODY_LABELS", "EXPRESSIONS", "FRAMINGS", "LABELS", "POSE_FAMILIES", "SCENES", "VIEWS", "Character", "GroupSample", "Sample",
    "SceneSpec", "appearance_combinations", "reference_on_canvas", "character_ids", "make_character", "on_photo", "render_group", "render_sample", "render_standard",
    "sample_scene", "split_of", "without_person",
]
