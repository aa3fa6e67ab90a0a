"""The depth study: which residual schemes train at 12, 64 and 128 layers, and the papers' claims.

``anydepth study [--quick]`` (``anydepth.study.cli.main``) trains the sweep of ``sweep.py`` through the
trainer, runs the deep fully connected experiment (``fc.py``) and Admin's output-change measurement
(``output_change.py``), decides each claim with the fixed rules of ``verdicts.py`` and writes
``report.md``, PNG plots and ``results.json`` (``report.py``). See docs/study.md.
"""
