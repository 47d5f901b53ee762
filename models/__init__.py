"""Model families, one package each (`models/wan/`), and their registry (`models/family.py`): the runtime asks
`family_for(model.path, model.preset)` for everything model-specific. Adding a family: its package and one line
below."""

from tessera.models.family import (
    family_for,
    family_names,
    get_family,
    preset_names,
    random_weight_presets,
    register_family,
    unregister_family,
)
from tessera.models.wan.family import WAN

register_family(WAN)

__all__ = ["family_for", "family_names", "get_family", "preset_names", "random_weight_presets", "register_family",
           "unregister_family"]
