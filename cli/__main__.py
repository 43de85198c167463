"""``python -m arbs_cli``: the ``arbs`` command (what ``torchrun ... -m arbs_cli train`` starts on each rank)."""

from .main import main

main(prog_name="arbs")
