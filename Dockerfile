# pyegress image: build a wheel and a virtual environment, ship only what runs.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pyegress ./pyegress
RUN python -m venv /opt/pyegress \
 && /opt/pyegress/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/pyegress/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/pyegress /opt/pyegress
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin pyegress
USER 10001
ENV PATH=/opt/pyegress/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 18080
ENTRYPOINT ["/opt/pyegress/bin/pyegress"]
CMD ["-L", "http://:18080"]
