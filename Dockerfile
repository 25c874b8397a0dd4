# pipeq image: one image for `pipeq db upgrade`, workers and producers.
# TORCH_SPEC picks the torch build: PyPI's default wheel is the CUDA build on Linux x86_64.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false
WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY pipeq ./pipeq
COPY migrations ./migrations
# metrics: `pipeq worker --metrics-port`; report: the charts of `pipeq report JOB --html FILE`.
RUN pip install ".[bnb,minilm,metrics,report]"
# Run as an unprivileged user (Celery warns about running as root, and nothing here needs it). The
# directories docker-compose mounts writable exist with that owner, so new named volumes inherit it;
# a bind-mounted ./data must be writable by uid 1000.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin pipeq \
 && mkdir -p /hf-cache /data \
 && chown pipeq:pipeq /hf-cache /data
USER pipeq
ENTRYPOINT ["pipeq"]
CMD ["--help"]
