# shellcheck shell=bash
# Per-site environment for the witscale Slurm templates, sourced by slurm/common.sh in the batch shell
# (so srun/torchrun pass it on to every rank). Point WITSCALE_SITE_ENV at your own copy to keep site
# settings out of the checkout. Values set in the submitting environment win (":=" only fills gaps).

# Modules / toolchains (site-specific):
# module load cuda/12.4 nccl/2.21

# Threads per rank: the trainer does its work on the GPU; keep CPU threads from oversubscribing the node.
: "${OMP_NUM_THREADS:=1}"
: "${TOKENIZERS_PARALLELISM:=false}"
: "${PYTHONWARNINGS:=ignore::FutureWarning}"
export OMP_NUM_THREADS TOKENIZERS_PARALLELISM PYTHONWARNINGS

# No hub downloads on compute nodes (most have no internet; a fetch would hang).
: "${HF_HUB_OFFLINE:=1}" "${HF_DATASETS_OFFLINE:=1}"
export HF_HUB_OFFLINE HF_DATASETS_OFFLINE

# NCCL: fail loudly instead of hanging on a dead peer; the rest depends on the fabric.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING
# export NCCL_DEBUG=WARN                 # INFO to see the chosen transport and rings
# export NCCL_SOCKET_IFNAME=ib0          # interface for bootstrap / TCP fallback (also GLOO_SOCKET_IFNAME)
# export NCCL_IB_HCA=mlx5_0,mlx5_1       # InfiniBand HCAs to use
# export NCCL_IB_GID_INDEX=3             # RoCE
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA
# export FI_PROVIDER=efa                 # AWS EFA (with the aws-ofi-nccl plugin)

# DeepSpeed picks the accelerator itself; a CPU-only test cluster wants DS_ACCELERATOR=cpu.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    : "${DS_ACCELERATOR:=cpu}"
    export DS_ACCELERATOR
fi
