"""FeedbackService: authenticated, validated, idempotent ingestion of prompts,
demonstrations, K-way rankings and labels into Kafka (see server.py)."""

# Call metadata of a BulkSubmit that is one submission (e.g. a labeler's
# ranking, labels and demonstration): every item is checked before any is
# written, so a bad one writes none of them.
VALIDATE_FIRST = ("rlhf-validate-first", "1")
