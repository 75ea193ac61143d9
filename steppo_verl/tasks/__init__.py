"""Tasks: one package per task family, each holding its data preparation, environment and configs.

- :mod:`steppo_verl.tasks.textworld`: TextWorld games generated on the spot (``pip install "steppo-verl[textworld]"``).

The method modules (protocol, estimators, loss, metrics) import nothing from here.
"""
