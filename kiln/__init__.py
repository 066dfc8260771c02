"""kiln: the shared kernel imported by both the API and the workers (no torch, no FastAPI here)."""

__version__ = "0.1.0"
