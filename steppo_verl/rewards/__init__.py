"""Rewards for agent tasks."""
