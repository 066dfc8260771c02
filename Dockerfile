# One image for the API, the workers, the predictor and `kiln migrate`.
#   docker build -t kiln:latest .                                                    # CPU torch (~1 GB smaller)
#   docker build -t kiln:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .  # CUDA torch, for GPU hosts
# A GPU host needs only the NVIDIA driver and the NVIDIA Container Toolkit: the CUDA torch wheels bring their own
# CUDA libraries.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KILN_DATA_DIR=/var/lib/kiln

# Torch first, pinned, in a layer of its own: an unpinned torch would pull whatever build the resolver likes, and
# this layer survives every change to kiln's code.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kiln kiln
COPY api api
COPY worker worker
COPY models models
COPY migrations migrations
# A fresh named volume mounted on /var/lib/kiln/artifacts takes that directory's owner, so the unprivileged user
# below can write to it. (KILN_DATA_DIR holds the workers' scratch files; it is no volume: nothing there outlives a job.)
RUN pip install '.[worker]' \
    && useradd --system --create-home --uid 10001 kiln \
    && mkdir -p /var/lib/kiln/artifacts && chown -R kiln:kiln /var/lib/kiln
USER kiln
EXPOSE 8000
# `docker run --gpus all --env-file kiln.env kiln:cuda` is a GPU worker; compose sets each service's command.
CMD ["kiln", "worker"]
