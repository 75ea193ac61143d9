"""StepPO's step-level GAE on two hand-made search trajectories, and the same batch through verl.

    python examples/step_advantages.py

Each row is one trajectory: action tokens (a search query, an answer) with observation tokens
(retrieved passages) between them. The outcome reward sits on the last token.
"""

import numpy as np
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import get_adv_estimator_fn

from steppo_verl.advantage import compute_steppo_advantage
from steppo_verl.protocol import gather_at_step_starts, locate_steps

#                 search-1   obs    search-2  obs     answer
layout = [[0, 0, 0, -1, -1, 1, 1, -1, -1, 2, 2],
          [0, 0, -1, -1, -1, 1, 1, 1, -1, -1, -1]]  # second one hit the turn limit after step 1
step_ids = torch.tensor(layout)
response_mask = (step_ids >= 0).long()
rewards = torch.zeros(step_ids.shape)
rewards[0, -1] = 1.0  # correct answer
values = torch.linspace(0.2, 0.8, step_ids.shape[1]).expand(2, -1).contiguous()  # a critic's V(s_t)
bootstrap = torch.tensor([0.0, 0.6])  # terminated -> 0; truncated -> V(state after the last step)

advantages, returns = compute_steppo_advantage(
    rewards, values, response_mask, step_ids=step_ids, gamma=0.99, lam=1.0, bootstrap_values=bootstrap, whiten=False
)
steps = locate_steps(response_mask, step_ids)
for b in range(2):
    print(f"trajectory {b}: {int(steps.num_steps[b])} steps")
    step_adv = gather_at_step_starts(advantages, steps)[b]
    step_val = gather_at_step_starts(values, steps)[b]
    for k in range(int(steps.num_steps[b])):
        print(f"  step {k}: V(s_k) = {step_val[k]:.3f}  A_k = {step_adv[k]:+.3f}")

# Group baselines go through verl's own registry by name, like any stock estimator.
uid = np.array(["q1", "q1"], dtype=object)
config = OmegaConf.create({"gamma": 1.0, "norm_adv_by_std_in_grpo": True})
for name in ("step_grpo", "gigpo"):
    adv, _ = get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=response_mask, index=uid,
                                        config=config, step_ids=step_ids)
    print(f"{name:10s} advantage of each trajectory's first token: {adv[:, 0].tolist()}")
