"""StepPO for verl: step-level credit assignment for multi-turn LLM agents.

Installing the package declares a ``verl.plugins`` entry point (:mod:`steppo_verl.plugin`), so
``import verl`` registers the estimators in every verl process.
"""

__version__ = "0.1.0"
