"""Simulated users, labelers and the gold preference they share.

- `tasks`: the task suite (prompt templates with checkable constraints) and
  the deterministic gold scorer `gold_score(prompt, response)`.
- `users`: a skewed population of simulated users who log prompts through
  the real FeedbackService.
- `labelers`: simulated labelers who write demonstrations and rank K
  samples from the real PolicyService by gold score.
- `report`: held-out evaluation against the gold scorer and the demo report.
"""
