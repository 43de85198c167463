"""arbs: train ternary (1.58-bit) networks whose persistent state is integer only.

The import is lean: no kernel is compiled and no GPU is touched until used.
"""

__version__ = "0.1.0"
