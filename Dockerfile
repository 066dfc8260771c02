FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY kiln kiln
COPY api api
COPY worker worker
COPY models models
COPY migrations migrations
# Torch pinned and installed first; from PyPI on x86_64 Linux this build runs on CPU and CUDA hosts alike.
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir '.[worker]'
USER nobody
