"""``fl-sim bench GRID.toml``: defense × attack grids over recorded runs (record once, attack
many), resumable, with results.csv, a markdown table, privacy–utility plots and report.html.

Modules: :mod:`~fl_sim.bench.grid` (grid file, expansion), :mod:`~fl_sim.bench.runner`
(execution, resume, dry-run estimate), :mod:`~fl_sim.bench.outputs` (tables, plots) and
:mod:`~fl_sim.bench.html` (the self-contained report).
"""
