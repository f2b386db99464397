#!/usr/bin/env bash
# witscale: the report job of a sweep — tools/collect_sweep.py over the sweep directory (sweep_report.md,
# sweep_figure.png …). slurm/followups.sh submits it after the training and evaluation arrays:
#
#   sbatch --dependency=afterany:<ids> slurm/sweep_report.sh WITSCALE_HOME PYTHON SWEEP_DIR
#
# Its values come as arguments, which Slurm hands to the script as they were given: never a string that a
# shell parses again (a quote or a $(…) in a path stays part of the path).
set -euo pipefail

[ "$#" -eq 3 ] || { echo "sweep_report.sh: usage: sweep_report.sh WITSCALE_HOME PYTHON SWEEP_DIR" >&2; exit 2; }
home=$1 py=$2 sweep=$3
cd -- "$home" || { echo "sweep_report.sh: cannot cd to $home" >&2; exit 2; }
exec "$py" tools/collect_sweep.py -- "$sweep"
