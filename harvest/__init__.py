"""Harvest: run the base model over SuperGPQA rollouts or packed corpus text and write its
residual stream into an activation cache (`python -m harvest run`). Module map: docs/harvest.md."""
