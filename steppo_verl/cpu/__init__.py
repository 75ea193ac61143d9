"""verl on CPU: a tiny offline model builder (and, with the CPU training path, platform and rollout backend)."""
