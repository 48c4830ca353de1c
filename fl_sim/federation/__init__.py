"""The federation engine: Flower apps (Message API), taps, checkpoints, simulation driver.

Importing ``fl_sim.federation`` imports flwr; ``fl_sim`` itself never does. Entry points:
:func:`fl_sim.federation.simulation.run_experiment` (in-process Ray simulation), and the Flower
App components ``fl_sim.federation.server_app:app`` / ``fl_sim.federation.client_app:app``
(``flwr run .`` and the Deployment Engine).
"""
