"""``hatchery``: the operator's command line."""
