"""Defense plug-ins: pure tensor transforms plus privacy accounting (no flwr, no ray).

fl_sim adapts them to Flower client mods and strategy wrappers. Defenses register in
``fl_sim.registry.DEFENSES``; the first ones arrive with the defenses issue.
"""
