# hpo worker / dashboard image: CPU PyTorch, then hpo. Built by docker-compose.yml (see README, "Many workers").
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# CPU build of the pinned torch first, so that hpo's own requirement (torch>=2.2,<3) pulls no CUDA wheels.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt ./deploy/
COPY hpo ./hpo
# every runtime dependency at the exact version the suite ran with (deploy/constraints.txt)
RUN pip install -c deploy/constraints.txt . && useradd --create-home --uid 1000 hpo \
    && mkdir -p /var/lib/hpo/checkpoints && chown hpo:hpo /var/lib/hpo/checkpoints && chmod 700 /var/lib/hpo/checkpoints
COPY studies ./studies
# Checkpoints go to a folder the worker's user owns (the relative default would be under /app, which is root's);
# compose mounts a named volume here, Kubernetes a volume under it.
ENV HPO_CHECKPOINT_DIR=/var/lib/hpo/checkpoints

USER hpo
# Compose gives each service its command; alone, the image shows what it can do.
CMD ["hpo", "--help"]
