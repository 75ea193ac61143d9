"""StepPO for verl: step-level credit assignment for multi-turn LLM agents.

Installing the package declares a ``verl.plugins`` entry point (:mod:`steppo_verl.plugin`), so
``import verl`` registers our components in every verl process.
"""

# verl imports its plugins (our steppo_verl.plugin, which imports most of this package) at the end
# of its own __init__. Importing verl here, before any submodule body runs, means a process whose
# first import is one of our submodules (a test, Ray unpickling a class in a fresh actor) lets the
# plugin finish loading our modules instead of meeting one of them half-initialised.
import verl  # noqa: F401

__version__ = "0.1.0"
