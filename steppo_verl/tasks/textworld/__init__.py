"""TextWorld games as a task for the environment agent loop (``steppo_env_agent``).

- :mod:`~steppo_verl.tasks.textworld.prepare`: generate games of a built-in challenge with TextWorld's own
  generator and write verl rows for train/validation/test splits with disjoint seeds; with ``--demos N``,
  random-command demonstrations of the training games for a tiny policy's warm start.
- :mod:`~steppo_verl.tasks.textworld.env`: :class:`TextWorldEnv`, one game per trajectory through
  ``textworld.gym``: reward = the game's score delta, terminated on won/lost, state key = the game's facts.
- reward: verl's reward function is the environments' one (:mod:`steppo_verl.envs.reward`): the score deltas
  reach the estimator as ``env_rewards``, and the reward function only reports won/lost.
- config: ``steppo_verl/config/task/textworld.yaml`` (``+task=textworld``); ``textworld_cpu.yaml``
  (``+task=textworld_cpu``) adds the CPU tasks' learning settings for a tiny policy
  (``recipe/steppo/run_cpu_textworld.sh``).

TextWorld is an optional dependency (its interpreter build is GPL): ``pip install "steppo-verl[textworld]"``.
Nothing here imports it at module import time.
"""
