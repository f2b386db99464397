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

# --- NCCL and torch.distributed: safe defaults, all overridable -------------------------------------------
# Fail loudly instead of hanging on a dead peer: a failed or timed-out NCCL collective aborts the communicator
# and the process (SIGABRT). After the first step the trainer's step watchdog (--step-timeout, 300 s) fires 60 s
# before that timeout, names the stalled rank, dumps the stacks and the flight recorder and requeues the job;
# the abort is the backstop.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
# On a timeout (or when the step watchdog fires), torch's flight recorder (the last collectives of every rank, with their sequence numbers) is
# dumped to TORCH_FR_DUMP_TEMP_FILE<rank> — read them with `python -m torch.distributed.flight_recorder.fr_trace`
# to see which rank never entered which collective. (TORCH_NCCL_DESYNC_DEBUG=1 also names the ranks that did
# not join, at some cost per collective: turn it on when chasing a hang.)
: "${TORCH_NCCL_TRACE_BUFFER_SIZE:=2000}"
: "${TORCH_NCCL_DUMP_ON_TIMEOUT:=1}"
: "${TORCH_FR_DUMP_TEMP_FILE:=${OUTPUT:-${TMPDIR:-/tmp}}/nccl_trace_rank_}"
# WARN: NCCL's own errors and warnings only (INFO: transport and ring choice, for debugging the fabric).
: "${NCCL_DEBUG:=WARN}"
# A Python traceback of every thread when a rank dies of SIGSEGV, SIGABRT (NCCL abort), SIGFPE or SIGBUS.
: "${PYTHONFAULTHANDLER:=1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_TRACE_BUFFER_SIZE TORCH_NCCL_DUMP_ON_TIMEOUT \
    TORCH_FR_DUMP_TEMP_FILE NCCL_DEBUG PYTHONFAULTHANDLER

# Fabric: left to the site — wrong values are worse than none (NCCL then probes and picks IB, else TCP).
# NCCL_SOCKET_IFNAME      interface for NCCL's bootstrap and its TCP fallback, e.g. ib0, or ^docker0,lo to
#                         exclude; set GLOO_SOCKET_IFNAME to the same (the gloo group and the store use it).
#                         Needed where the first interface is docker0/virbr0 or a slow management network.
# NCCL_IB_HCA             the InfiniBand HCAs to use (mlx5_0,mlx5_1 …; ^mlx5_4 excludes the storage one)
# NCCL_IB_GID_INDEX       RoCE only: the GID index of the RoCEv2 address (often 3)
# NCCL_IB_TIMEOUT         IB retransmission timeout exponent (default 20 in recent NCCL; 22 on lossy fabrics)
# NCCL_NET_GDR_LEVEL      GPUDirect RDMA distance (PHB, SYS …), when the site's topology needs it
# FI_PROVIDER=efa         AWS EFA (with the aws-ofi-nccl plugin)
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5_0,mlx5_1

# DS_ACCELERATOR is decided in common.sh (wit_accelerator): cpu only where no GPU is allocated and torch sees none.
