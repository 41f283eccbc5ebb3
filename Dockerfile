# The image of the renderfarm chart: the scheduler (`renderfarm serve`) and every
# Ray pod (KubeRay runs `ray start` in it). PyPI's Linux torch wheels are CUDA
# builds that carry their own CUDA and cuDNN libraries, so a plain Python base
# suffices; the node's NVIDIA driver comes in through the container runtime.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay's generated probes run wget in Ray's containers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# The chart runs everything as uid 1000.
RUN useradd --uid 1000 --user-group --create-home renderfarm

# Into the system site-packages, so `ray` and `renderfarm` are on PATH in KubeRay's
# login shells (which reset PATH to the system directories).
COPY pyproject.toml README.md /src/
COPY sdk /src/sdk
COPY cluster /src/cluster
COPY actors /src/actors
COPY protos /src/protos
RUN pip install "/src[cluster]" && rm -rf /src

USER 1000
WORKDIR /home/renderfarm
# KubeRay replaces the command of Ray's containers; the chart names the scheduler's.
CMD ["renderfarm", "serve", "--config", "/etc/renderfarm/farm.toml"]
