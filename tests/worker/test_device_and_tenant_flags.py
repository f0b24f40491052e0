"""A device the worker cannot use, and a demo tenant the control plane would refuse, stop `worker` and
`up` at once in one line naming the flag (exit 2), before anything starts. A worker given `--device cuda`
on a CPU-only torch died with a traceback (exit 1), so `up` restarted it for 300 s and then said only
that it never became SERVING; a bad `--tenant` failed after everything had started, as a raw gRPC
error naming `name`."""

from __future__ import annotations

import pytest

from openlora.commands.serving import cuda_problem, device_problem
from tests.refused_flags import assert_refused_before_start


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_the_worker_takes(device):
    assert device_problem(device) is None


@pytest.mark.parametrize(
    "device", ["", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:0:1", "cpu:0", " cpu", "mps"]
)
def test_other_device_names_are_refused(device):
    assert device_problem(device) == f"must be cpu, cuda or cuda:N, got {device!r}"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--device", "gpu"], {}, "--device (OPENLORA_DEVICE) must be cpu, cuda or cuda:N, got 'gpu'"),
        (
            [],
            {"OPENLORA_DEVICE": "cuda:x"},
            "--device (OPENLORA_DEVICE) must be cpu, cuda or cuda:N, got 'cuda:x'",
        ),
        # No machine has 1000 GPUs: refused on a CPU-only torch (no GPU) and on a GPU machine (no index).
        (["--device", "cuda:999"], {}, "--device (OPENLORA_DEVICE) is 'cuda:999', but "),
    ],
)
def test_worker_refuses_a_device_it_cannot_use_before_starting(
    tmp_path, monkeypatch, capsys, argv, env, message
):
    assert_refused_before_start(
        "worker", tmp_path, monkeypatch, capsys, argv, env, message, ["OPENLORA_DEVICE"]
    )


def test_cuda_on_a_machine_without_one_says_to_use_cpu():
    import torch

    if torch.cuda.is_available():
        assert cuda_problem("cuda") is None
    else:
        assert cuda_problem("cuda").endswith(": use cpu")
    assert cuda_problem("cpu") is None


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--device", "cuda0"], {}, "--device (OPENLORA_DEVICE) must be cpu, cuda or cuda:N, got 'cuda0'"),
        (
            ["--tenant", "bad name!"],
            {},
            "--tenant (OPENLORA_TENANT) must be 1..64 characters of [A-Za-z0-9_.-], got 'bad name!'",
        ),
        ([], {"OPENLORA_TENANT": "x" * 65}, "--tenant (OPENLORA_TENANT) must be 1..64 characters"),
    ],
)
def test_up_refuses_a_bad_device_or_tenant_before_starting_anything(
    tmp_path, monkeypatch, capsys, argv, env, message
):
    cleared = ["OPENLORA_DEVICE", "OPENLORA_TENANT"]
    assert_refused_before_start("up", tmp_path, monkeypatch, capsys, argv, env, message, cleared)


def test_up_refuses_a_device_this_machine_cannot_use_before_starting_anything(tmp_path, monkeypatch, capsys):
    # No machine has 1000 GPUs: `up` checks CUDA itself, before the databases, the control plane and the
    # demo model's training (the worker's refusal came only after them, in its log's tail).
    assert_refused_before_start(
        "up",
        tmp_path,
        monkeypatch,
        capsys,
        ["--device", "cuda:999"],
        {},
        "--device (OPENLORA_DEVICE) is 'cuda:999', but ",
        ["OPENLORA_DEVICE", "OPENLORA_TENANT"],
    )
