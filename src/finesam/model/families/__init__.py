"""The registered encoder families: each module here registers one (`finesam.model.registry.register_family`).

Adding a family: its module here (config, chain, presets, LoRA targets), its checkpoint layout in
`finesam.weights.layouts.<name>`, and its name on the registration line below (see docs/architecture.md).
"""

import importlib

# the registration line: one module name per family, in the order `finesam models` and `PRESETS` list them
REGISTERED = ("vit", "tiny_vit", "slimsam", "hiera", "edge_sam", "efficient_sam", "efficientvit")

for _name in REGISTERED:
    importlib.import_module(f"{__name__}.{_name}")  # importing a family's module registers it
