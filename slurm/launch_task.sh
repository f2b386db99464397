#!/usr/bin/env bash
# One task of a witscale launch, started by slurm/common.sh through srun (or mpirun): turns the Slurm
# task into a launcher (torchrun / deepspeed: one per node) or into one rank (srun / srun-mpi / mpirun).
# Arguments: the trainer script and its flags. Settings come from the environment (common.sh exports them).
set -euo pipefail

# Slurm signals EVERY process of a step. The launchers would die on USR1 (no handler) and would kill
# their workers on TERM; ignored here, the dispositions pass through exec to the workers, which stay
# immune until witscale/train.py installs its own handlers (its first act) — an early signal is then
# lost, not fatal, and common.sh sends it again. torchrun would re-arm TERM (and SIGKILL its workers 30 s
# after forwarding it): witscale/launch.py runs it without. DeepSpeed's launcher kills its workers on
# TERM whatever we do (deepspeed/launcher/launch.py's sigkill_handler): prefer torchrun or srun.
trap '' USR1 TERM

# $SLURM_NODEID is read here, inside each task: in the batch script it would be node 0 everywhere.
case "$LAUNCHER" in
    torchrun)
        # witscale/launch.py: torchrun that leaves TERM/USR1 to the ranks (forwarded, never a 30-s SIGKILL
        # in the middle of a checkpoint; exit 0 once the ranks have checkpointed).
        exec "$PYTHON" "$WITSCALE_HOME/witscale/launch.py" --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
            --node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"
        ;;
    deepspeed)
        exec "$PYTHON" -m deepspeed.launcher.runner --no_ssh --hostfile="$WIT_HOSTFILE" \
            --node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"
        ;;
    srun)
        # one task per GPU: Slurm's task ids are the ranks
        export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
        export LOCAL_WORLD_SIZE=$NPROC_PER_NODE
        exec "$PYTHON" "$@"
        ;;
    srun-mpi | mpirun)
        # ranks come from PMI/PMIx (OMPI_*/PMI_* variables) through mpi4py
        exec "$PYTHON" "$@"
        ;;
    *)
        echo "launch_task.sh: unknown LAUNCHER=$LAUNCHER" >&2
        exit 2
        ;;
esac
