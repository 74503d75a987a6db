"""LabelingService: the labeling queue drawn from logged prompts, K samples
from the serving policies, leases, overlap and labeler agreement (server.py)."""
