"""FeedbackService: authenticated, validated, idempotent ingestion of prompts,
demonstrations, K-way rankings and labels into Kafka (see server.py)."""

# Re-exported for callers that imported it from here; its home is the
# feedback vocabulary (other packages import it from services.common.feedback).
from services.common.feedback import VALIDATE_FIRST

__all__ = ["VALIDATE_FIRST"]
