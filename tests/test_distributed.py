"""`training.check_launch`: a launch whose processes each believe they are alone stops instead of training copies.

The end-to-end launches (2-process CPU data parallel, and `accelerate launch --multi_gpu` on a machine without GPUs)
are in test_train_predict.py; these cover the launchers that cannot be run here (MPI) in-process.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from multimodal.training import RANK_VARS, WORLD_SIZE_VARS, check_launch


def state(num_processes: int) -> SimpleNamespace:
    kind = DistributedType.NO if num_processes == 1 else DistributedType.MULTI_CPU
    return SimpleNamespace(num_processes=num_processes, distributed_type=kind)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*WORLD_SIZE_VARS, *RANK_VARS):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},  # torchrun / accelerate launch, no process group: rank 0
    {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"},  # ... and rank 1
    {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"},  # mpirun (Open MPI) without ACCELERATE_USE_CPU
    {"PMI_SIZE": "2", "PMI_RANK": "0"},  # Intel MPI / MPICH
    {"PMI_RANK": "1"},  # a non-zero rank alone is enough
    {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"},  # srun -n 4 python train.py
])
def test_lone_processes_of_a_multi_process_launch_stop(clean_env: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SystemExit, match="each process would train its own copy.*ACCELERATE_USE_CPU=true"):
        check_launch(state(1))


def test_slurm_launch_error_says_how_to_launch_under_slurm(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
    clean_env.setenv("SLURM_PROCID", "1")
    with pytest.raises(SystemExit, match="Under Slurm, let srun start one `accelerate launch` per node"):
        check_launch(state(1))


def test_world_size_disagreeing_with_the_process_group_stops(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("RANK", "1")
    with pytest.raises(SystemExit, match="WORLD_SIZE=4"):
        check_launch(state(2))


@pytest.mark.parametrize("num_processes, env", [
    (1, {}),  # python train.py
    (1, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}),  # accelerate launch with one process
    (2, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}),  # a working 2-process group
    (2, {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}),  # mpirun with ACCELERATE_USE_CPU=true
    (1, {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}),  # python train.py in an sbatch script that asked for 4 tasks
    (1, {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}),  # srun -n 1 python train.py
    # srun -N 2 --ntasks-per-node=1 accelerate launch (4 processes per node)
    (8, {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "WORLD_SIZE": "8", "RANK": "5"}),
])
def test_consistent_launches_pass(clean_env: pytest.MonkeyPatch, num_processes: int, env: dict[str, str]) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    check_launch(state(num_processes))
