# One image for both processes: `openlora control-plane` and `openlora worker`.
# CPU by default; build with --build-arg TORCH_SPEC="torch==2.13.0 --index-url <cuda wheel index>" for NVIDIA hosts.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
# A C compiler: the worker builds its int4 CPU kernel for the machine it runs on (data_plane/model/quant/native.py).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN pip install $TORCH_SPEC
COPY pyproject.toml README.md ./
COPY openlora ./openlora
COPY control_plane ./control_plane
COPY data_plane ./data_plane
COPY openlora_kernels ./openlora_kernels
COPY migrations ./migrations
COPY protos ./protos
# Editable: the control plane finds migrations/ beside its package.
RUN pip install -e .

RUN useradd --create-home --uid 1000 openlora && mkdir -p /var/lib/openlora && chown openlora /var/lib/openlora
USER openlora
VOLUME ["/var/lib/openlora"]
ENTRYPOINT ["openlora"]
