"""arbs: train ternary (1.58-bit) networks whose persistent state is integer only.

The public API, by module (each imported on first use, so ``import arbs`` compiles no kernel, touches
no GPU and imports no torch):

- ``arbs.formats``  the E1TM table: variants, arrays, rules, the rule parameter table
- ``arbs.ops``      validated numpy API: pack, unpack, materialize, vote, fuse, convert
- ``arbs.store``    atomic, validated Zarr v3 checkpoints and run directories
- ``arbs.nn``       E1TM layers for any PyTorch model: ternarize_, step, accumulate
- ``arbs.training`` TrainConfig and train, the one training loop
- ``arbs.convert``, ``arbs.fuse``, ``arbs.inspect``, ``arbs.compare``  workflows behind the CLI
"""

import importlib

__version__ = "0.1.0"

__all__ = [
    "compare", "convert", "data", "errors", "formats", "fuse", "inspect", "models", "nn", "ops", "plots",
    "schedule", "store", "training",
]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
