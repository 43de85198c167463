"""The ``arbs`` command line (installed as the ``arbs_cli`` package): thin click wrappers over arbs.

Each command lives in its own module and is registered in :mod:`arbs_cli.main`.
"""
