"""anpyc.apps: applications of the libraries, each a recipe that trains and exports end to end.

:mod:`anpyc.apps.check` checks a backbone (walk, learn a few pruned synthetic tasks, export with parity) and
:mod:`anpyc.apps.quickstart` holds the quickstart's recipe and stages. They sit between the CLI and the libraries:
they may import the learner (``anpyc``), the adapters and the exporter, and nothing below them imports them
(ARCHITECTURE.md).
"""
