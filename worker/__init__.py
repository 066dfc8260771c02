"""The worker side of kiln: Celery tasks, the job runner, built-in datasets and the pure training loop."""
