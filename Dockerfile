# One image for the dashboard and the workers. On a GPU host, torch==2.13.0 from PyPI is the CUDA build.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make npm git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/rana
COPY requirements.txt pyproject.toml Makefile README.md ./
COPY scripts ./scripts
COPY rana_core ./rana_core
COPY jobs ./jobs
COPY db ./db
COPY app ./app
COPY rana_cli ./rana_cli
RUN make setup
# No .git in the image: pass the commit so that every run's provenance names it.
ARG GIT_SHA=unknown
ENV PATH=/opt/rana/.venv/bin:$PATH \
    RANA_DATA_DIR=/data \
    RANA_GIT_SHA=$GIT_SHA
VOLUME /data
