# The abdag worker / dashboard image. CPU torch by default; for CUDA, build on an NVIDIA
# base image and pass TORCH_INDEX_URL for a CUDA build of torch 2.13.0.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=""
WORKDIR /app
COPY pyproject.toml README.md ./
COPY abdag ./abdag
COPY agents ./agents
COPY topics ./topics
COPY models ./models
COPY comparators ./comparators
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX_URL"; fi \
    && pip install --no-cache-dir . \
    && useradd --create-home abdag && mkdir -p /var/lib/abdag && chown abdag /var/lib/abdag
USER abdag
ENV ABDAG_DATA_DIR=/var/lib/abdag
ENTRYPOINT []
CMD ["abdag", "--help"]
