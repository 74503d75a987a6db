"""RewardService: batched reward-model scoring with checkpoint hot-swap."""
