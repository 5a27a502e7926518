"""The import layers of mstok, bottom to top: the one declaration (docs/architecture.md explains it).

A module may import modules of its own layer or of a lower one, never of a higher one, at module
level or inside a function; packages may not import each other in a cycle, nor modules. The
only upward import allowed is a deprecation shim: a module-level ``__getattr__`` that warns with
a ``DeprecationWarning`` and imports an old name from its new, higher home. Every other
function-level ``mstok`` import carries a ``# lazy: <why>`` comment (on its line or on the
comment line above it): a heavy dependency (Gradio, diffusers...) loaded only where it is used.

``tests/test_architecture.py`` checks all of it. Each entry is ``(layer, module prefixes)``; a
module belongs to the layer of its longest matching prefix (``"mstok"`` alone is the package's
``__init__``, which re-exports the public API and so sits on top).
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # no mstok imports, or only each other: file I/O, config schema checks, image grids, devices
    ("base", ("mstok._layers", "mstok.io", "mstok.config_schema", "mstok.images", "mstok.device")),
    # on-disk layout, the loading rule, the saved-model format, pretrained weight files
    # (mstok.saved and mstok.weights: deprecated aliases)
    ("storage", ("mstok.storage", "mstok.saved", "mstok.weights")),
    ("layers", ("mstok.layers",)),
    ("quantizers", ("mstok.quantizers",)),
    ("diffusion", ("mstok.diffusion",)),
    # the models: tokenizer and generator families with their registries, the reference network
    ("models", ("mstok.tokenizers", "mstok.generators", "mstok.networks")),
    # loading a model of any family by path or hub id, official converters (mstok.convert: deprecated aliases)
    ("persistence", ("mstok.persistence", "mstok.convert")),
    ("data", ("mstok.data",)),
    ("losses", ("mstok.losses",)),
    ("evaluation", ("mstok.evaluation",)),
    ("training", ("mstok.training",)),
    # the command line, the demos, the web app (mstok.app) and the package's public API (mstok/__init__.py)
    (
        "app",
        (
            "mstok",
            "mstok.cli",
            "mstok.cli_errors",
            "mstok.cli_generation",
            "mstok.cli_reference",
            "mstok.demo",
            "mstok.demo_official",
            "mstok.app",
        ),
    ),
)

# modules kept only so old import paths work; importing one warns (DeprecationWarning)
DEPRECATED_MODULES: tuple[str, ...] = (
    "mstok.saved",
    "mstok.weights",
    "mstok.convert.generator",
    "mstok.convert.hub",
    "mstok.convert.titok",
)
