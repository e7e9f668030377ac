"""sslpipe.models.training.distributed: the launcher's environment, read and checked; single-process
no-ops.

The collectives in several processes are exercised by tests/models/moco/test_ddp.py,
tests/steps/test_moco_train_ddp.py and tests/execution/test_local_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from sslpipe.models.training import distributed
from sslpipe.models.training.distributed import DistEnv, DistributedEnvError

TORCHRUN_ENV = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.4",
    "MASTER_PORT": "29500",
}


def test_no_variables_mean_one_process() -> None:
    env = DistEnv.from_env({})
    assert env == DistEnv(rank=0, world_size=1, local_rank=0)
    assert env.is_main and not env.is_distributed


def test_the_launcher_variables_are_read() -> None:
    env = DistEnv.from_env(TORCHRUN_ENV)
    assert env == DistEnv(
        rank=3, world_size=4, local_rank=1, master_addr="10.0.0.4", master_port=29500
    )
    assert env.is_distributed and not env.is_main


def test_a_world_of_one_needs_no_master() -> None:
    assert DistEnv.from_env({"RANK": "0", "WORLD_SIZE": "1"}).is_main


def test_local_rank_defaults_to_the_rank() -> None:
    env = DistEnv.from_env({k: v for k, v in TORCHRUN_ENV.items() if k != "LOCAL_RANK"})
    assert env.local_rank == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"RANK": "4"}, r"RANK=4 is outside 0\.\.3 \(WORLD_SIZE=4\)"),
        ({"RANK": "-1"}, r"RANK=-1 is outside"),
        ({"WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"}, r"WORLD_SIZE=0"),
        ({"WORLD_SIZE": "four"}, r"WORLD_SIZE='four' is not an integer"),
        ({"MASTER_PORT": "http"}, r"MASTER_PORT='http' is not an integer"),
        ({"MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a port"),
        ({"MASTER_ADDR": ""}, r"MASTER_ADDR is not set"),
        ({"LOCAL_RANK": "5"}, r"LOCAL_RANK=5 must be between 0 and RANK=3"),
    ],
)
def test_inconsistent_variables_are_refused_naming_them(
    changes: dict[str, str], message: str
) -> None:
    with pytest.raises(DistributedEnvError, match=message):
        DistEnv.from_env({**TORCHRUN_ENV, **changes})


def test_rank_without_world_size_is_refused() -> None:
    with pytest.raises(DistributedEnvError, match=r"RANK=2 is set but WORLD_SIZE is not"):
        DistEnv.from_env({"RANK": "2"})


def test_missing_master_port_is_refused() -> None:
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != "MASTER_PORT"}
    with pytest.raises(DistributedEnvError, match=r"MASTER_PORT=None"):
        DistEnv.from_env(env)


def test_the_error_is_a_value_error_so_components_report_it_in_one_line() -> None:
    assert issubclass(DistributedEnvError, ValueError)


def test_the_backend_follows_the_device() -> None:
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"


def test_without_a_process_group_the_helpers_are_single_process_no_ops() -> None:
    with distributed.session(DistEnv()) as device:
        assert not distributed.is_initialized()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        if not torch.cuda.is_available():
            assert device == torch.device("cpu")
        x = torch.arange(6.0).reshape(3, 2)
        assert distributed.all_gather(x).data_ptr() == x.data_ptr()  # no copy
        assert distributed.all_reduce_sum(x) is x
        distributed.broadcast_([x])
        distributed.barrier()
        assert torch.equal(x, torch.arange(6.0).reshape(3, 2))


def test_keys_are_gathered_without_gradient() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    assert not distributed.all_gather(x * 2).requires_grad
