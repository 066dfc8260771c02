"""The kiln HTTP API (FastAPI). Never imports torch or the worker's task code."""
