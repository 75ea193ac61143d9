"""The vault: a small multi-step task with a delayed reward, for learning runs of a tiny policy on CPU.

- :mod:`~steppo_verl.tasks.vault.prepare`: ``python -m steppo_verl.tasks.vault.prepare --out DIR``, the world
  (:class:`~steppo_verl.tasks.vault.prepare.VaultWorld`), verl rows for ``steppo_agent``, and the warm-start
  demonstrations (random doors, so the warm start teaches only the format); its docstring explains the design.
- :mod:`~steppo_verl.tasks.vault.env`: the vault's dynamics (:class:`~steppo_verl.tasks.vault.env.VaultPath`) and
  :class:`~steppo_verl.tasks.vault.env.VaultEnv`, the vault on the environment interface (a door is the action;
  exact room state keys) for the environment agent loop.
- :mod:`~steppo_verl.tasks.vault.tool`: the ``open_door`` tool (a verl ``BaseTool``), an adapter over
  :class:`~steppo_verl.tasks.vault.env.VaultEnv` with the same observations, declared to verl by
  ``vault_tool.yaml`` beside it; ``vault_agent_loop.yaml`` is the task's agent-loop config.
- :mod:`~steppo_verl.tasks.vault.reward`: 1 if an observation shows the vault open and the policy answers
  ``open`` (``pkg://steppo_verl.tasks.vault.reward``). It reads the answer with the shared parser
  (:func:`steppo_verl.transcript.policy_answer`), so that both tasks read ``<answer>`` alike.
- :mod:`~steppo_verl.tasks.vault.oracle`: the world's exact state values under the current policy, from its door
  probabilities (``algorithm.steppo.values=oracle``: the upper bound of step credit, a measurement arm).
- :mod:`~steppo_verl.tasks.vault.representable`: ``python -m steppo_verl.tasks.vault.representable``, whether
  the warm-started tiny policy can represent a world's optimal policy at all.
- config: ``steppo_verl/config/task/vault.yaml`` (``+task=vault``, on top of ``tiny_policy.yaml``, the CPU tasks'
  learning settings; hydra looks for task configs under
  ``steppo_verl/config/task``). ``recipe/steppo/run_cpu_vault.sh`` runs it all.

The tiny model and its warm start on the demonstrations are task-independent development helpers
(:mod:`steppo_verl.dev`).
"""
