# The image every service of docker-compose.yml runs.
FROM python:3.11-slim

# A small CPU build of torch: put its wheel in ./wheels (pip download --no-deps -d wheels
# torch==2.13.0) to install it without a download; otherwise pip fetches TORCH_SPEC.
ARG TORCH_SPEC=torch==2.13.0
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir --find-links /app/wheels "${TORCH_SPEC}" \
    && pip install --no-cache-dir --find-links /app/wheels /app \
    && rm -rf /app/wheels
ENV PYTHONUNBUFFERED=1
CMD ["ps-server", "--help"]
