"""Example fl-sim plug-ins (see docs/PLUGINS.md): the attack :mod:`.fc_analytic` and the
defense :mod:`.update_noise`, installed through the entry points of this package's
pyproject.toml."""
