# hybridpar on a CUDA PyTorch image; the entry point is torchrun running hybridpar.train, so Hydra
# overrides go at the end of `docker run`:
#   docker build -t hybridpar .
#   docker run --gpus all --ipc=host -v /data/imagenet:/data/imagenet:ro -v "$PWD/runs:/workspace/runs" \
#     hybridpar data=imagenet data.root=/data/imagenet
# Multi-node: override the entry point with launch/multi_node.sh's torchrun line (see docs/launch.md).
# NCCL: nothing is baked in. On clusters set NCCL_SOCKET_IFNAME / NCCL_IB_HCA for your fabric;
# NCCL_DEBUG=INFO only when debugging. --ipc=host (or a large --shm-size) is needed by the
# DataLoader workers' shared memory.
ARG BASE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    WANDB_MODE=offline

WORKDIR /opt/hybridpar
COPY pyproject.toml README.md ./
COPY hybridpar ./hybridpar
COPY conf ./conf
# Not editable: the configs ship inside the package (hybridpar.conf), found from any directory.
RUN pip install --no-cache-dir . && rm -rf /opt/hybridpar/build

# A numeric non-root user; runs and checkpoints go to /workspace (mount a volume there).
RUN mkdir -p /workspace && chown 10001:10001 /workspace
USER 10001:10001
WORKDIR /workspace

ENTRYPOINT ["torchrun", "--standalone", "--nproc_per_node=gpu", "-m", "hybridpar.train"]
