"""CUDA parity of the estimators (marker `gpu`; skipped cleanly without a CUDA device)."""

import numpy as np
import pytest
import torch
from layouts import random_layout

from steppo_verl.advantage import compute_gigpo_advantage, compute_steppo_advantage

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seed", range(4))
def test_steppo_on_cuda_matches_cpu(seed):
    layout = random_layout(seed, batch_size=16)
    args = (layout.rewards, layout.values, layout.response_mask)
    kwargs = dict(gamma=0.99, lam=0.95, whiten=True)
    cpu = compute_steppo_advantage(*args, step_ids=layout.step_ids, bootstrap_values=layout.bootstrap, **kwargs)
    gpu = compute_steppo_advantage(
        *(t.cuda() for t in args), step_ids=layout.step_ids.cuda(), bootstrap_values=layout.bootstrap.cuda(), **kwargs
    )
    for c, g in zip(cpu, gpu):
        assert g.is_cuda
        torch.testing.assert_close(g.cpu(), c, atol=1e-5, rtol=1e-5)


def test_gigpo_on_cuda_matches_cpu():
    layout = random_layout(1, batch_size=16)
    uid = np.array([f"p{i // 4}" for i in range(16)], dtype=object)
    cpu, _ = compute_gigpo_advantage(layout.rewards, layout.response_mask, uid, layout.step_ids, gamma=0.9)
    gpu, _ = compute_gigpo_advantage(
        layout.rewards.cuda(), layout.response_mask.cuda(), uid, layout.step_ids.cuda(), gamma=0.9
    )
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
