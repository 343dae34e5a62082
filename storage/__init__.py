"""SQLite persistence for Ouro: `Store` and the records it hands out."""

from storage.errors import (
    ConflictError,
    InvalidArgumentError,
    MigrationError,
    NotFoundError,
    StoreBusyError,
    StoreClosedError,
    StoreError,
)
from storage.models import (
    AdapterScope,
    AdapterStatus,
    AdapterVersion,
    Correction,
    CorrectionScope,
    CorrectionStatus,
    Feedback,
    JobStatus,
    Message,
    Rating,
    RetrainOutcome,
    Role,
    TrainingJob,
    User,
)
from storage.store import Store

__all__ = [
    "AdapterScope",
    "AdapterStatus",
    "AdapterVersion",
    "ConflictError",
    "Correction",
    "CorrectionScope",
    "CorrectionStatus",
    "Feedback",
    "InvalidArgumentError",
    "JobStatus",
    "Message",
    "MigrationError",
    "NotFoundError",
    "Rating",
    "RetrainOutcome",
    "Role",
    "Store",
    "StoreBusyError",
    "StoreClosedError",
    "StoreError",
    "TrainingJob",
    "User",
]
