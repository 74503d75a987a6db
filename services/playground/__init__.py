"""The playground: a web page (`python -m services.playground`) and a terminal
client (`rlhf-playground`) for prompting the policy and for labeling:
demonstrations, K-way rankings, Likert scores and flags.

Both talk only to the PolicyService and the FeedbackService over gRPC.
"""
