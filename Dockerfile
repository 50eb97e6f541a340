# The image every service of docker-compose.yml runs.
FROM python:3.11-slim

# A small CPU build of torch: put its wheel in ./wheels (pip download --no-deps -d wheels
# torch==2.13.0; `make compose-test` does) to install it without a download; otherwise pip
# fetches TORCH_SPEC. A virtual environment keeps the install clear of the system Python
# (which Debian-based images mark as externally managed).
ARG TORCH_SPEC=torch==2.13.0
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
COPY . /app
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --find-links /app/wheels "${TORCH_SPEC}" \
    && pip install --no-cache-dir --find-links /app/wheels /app \
    && rm -rf /app/wheels
CMD ["ps-server", "--help"]
