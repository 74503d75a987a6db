"""FeedbackService: authenticated, validated, idempotent ingestion of prompts,
demonstrations, K-way rankings and labels into Kafka (see server.py)."""
