# The application image: the REST API, the Ray head and the Ray workers (and the MLflow
# server) all run it. CPU build by default; a CUDA build with
#   docker compose build --build-arg TORCH_VARIANT=cu130
# Dependencies are pinned exactly as in pyproject.toml (torch comes from PyTorch's own index
# for the chosen variant, at the same version).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --gid 10001 spark \
    && useradd --uid 10001 --gid spark --create-home --shell /usr/sbin/nologin spark \
    && mkdir -p /mlflow-auth /data \
    && chown spark:spark /mlflow-auth

WORKDIR /app
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY spark_core ./spark_core
COPY orchestrator ./orchestrator
COPY jobs ./jobs
COPY api ./api
COPY examples ./examples
COPY deploy ./deploy
# boto3: the MLflow server's artifact store on MinIO (S3), and nothing else.
RUN pip install . boto3==1.44.8

USER spark
ENV SPARKORCH_HOME=/home/spark/.sparkorch
EXPOSE 8000 5000 6379 8265 10001
CMD ["python", "-m", "api"]
