"""--quantize / --quantize-lm-head / OPENLORA_QUANTIZE reach the engine's config; bad values stop
`openlora worker` and `openlora up` before anything starts, with the cause and the choices; so does a
model whose linears the format cannot pack."""

from __future__ import annotations

import argparse

import pytest

from openlora.commands.serving import add_commands, main, worker_config_from_args
from tests.refused_flags import assert_refused_before_start

from .helpers import write_llama

REQUIRED = ["--control-plane", "cp:1", "--worker-token", "t" * 20]
# Named by flag and variable: the value may have come from either.
NOT_A_FORMAT = "--quantize (OPENLORA_QUANTIZE) must be one of none, int8, int4, got"
LM_HEAD_NEEDS_A_FORMAT = (
    "--quantize-lm-head (OPENLORA_QUANTIZE_LM_HEAD) needs --quantize (OPENLORA_QUANTIZE) int8 or int4"
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_quantize_flags_reach_the_engine_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENLORA_QUANTIZE", raising=False)
    default = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *REQUIRED]))
    assert (default.engine.quantize, default.engine.quantize_lm_head) == ("none", False)
    args = _parse(["worker", "--model", str(tmp_path), *REQUIRED, "--quantize", "int4", "--quantize-lm-head"])
    config = worker_config_from_args(args)
    assert (config.engine.quantize, config.engine.quantize_lm_head) == ("int4", True)


@pytest.mark.parametrize(
    ("word", "expected"),
    [("1", True), ("YES", True), ("On", True), ("off", False), ("0", False), ("", False)],
)
def test_quantize_lm_head_variable_reads_yes_and_no_words(tmp_path, monkeypatch, word, expected):
    monkeypatch.setenv("OPENLORA_QUANTIZE", "int4")
    monkeypatch.setenv("OPENLORA_QUANTIZE_LM_HEAD", word)
    config = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *REQUIRED]))
    assert config.engine.quantize_lm_head is expected


def test_environment_is_the_fallback_for_quantize(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_QUANTIZE", "int8")
    monkeypatch.setenv("OPENLORA_QUANTIZE_LM_HEAD", "true")
    config = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *REQUIRED]))
    assert (config.engine.quantize, config.engine.quantize_lm_head) == ("int8", True)
    flagged = worker_config_from_args(
        _parse(["worker", "--model", str(tmp_path), *REQUIRED, "--quantize", "int4"])
    )
    assert flagged.engine.quantize == "int4"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--quantize", "fp4"], {}, f"{NOT_A_FORMAT} 'fp4'"),
        ([], {"OPENLORA_QUANTIZE": "int4 "}, f"{NOT_A_FORMAT} 'int4 '"),
        (["--quantize", ""], {}, f"{NOT_A_FORMAT} ''"),
        (["--quantize-lm-head"], {}, LM_HEAD_NEEDS_A_FORMAT),
        (
            ["--quantize", "int8"],
            {"OPENLORA_QUANTIZE_LM_HEAD": "maybe"},
            "OPENLORA_QUANTIZE_LM_HEAD (for --quantize-lm-head) must be one of",
        ),
        ([], {"OPENLORA_QUANTIZE_LM_HEAD": "on"}, LM_HEAD_NEEDS_A_FORMAT),
    ],
)
def test_worker_refuses_a_bad_quantize_value_before_starting(
    tmp_path, monkeypatch, capsys, argv, env, message
):
    assert_refused_before_start(
        "worker", tmp_path, monkeypatch, capsys, argv, env, message, ["OPENLORA_QUANTIZE"]
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--quantize", "int2"], {}, f"{NOT_A_FORMAT} 'int2'"),
        ([], {"OPENLORA_QUANTIZE": " int4"}, f"{NOT_A_FORMAT} ' int4'"),
        (["--quantize-lm-head"], {}, LM_HEAD_NEEDS_A_FORMAT),
        (
            ["--quantize", "int4"],
            {"OPENLORA_QUANTIZE_LM_HEAD": "sure"},
            "OPENLORA_QUANTIZE_LM_HEAD (for --quantize-lm-head) must be one of",
        ),
    ],
)
def test_up_refuses_a_bad_quantize_value_before_starting_anything(
    tmp_path, monkeypatch, capsys, argv, env, message
):
    assert_refused_before_start(
        "up", tmp_path, monkeypatch, capsys, argv, env, message, ["OPENLORA_QUANTIZE"]
    )


def test_worker_refuses_int4_for_a_model_it_cannot_group_before_serving(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENLORA_QUANTIZE", raising=False)
    model_dir = write_llama(tmp_path / "model", intermediate_size=344)
    state_dir = tmp_path / "state"
    code = main(
        ["worker", "--model", str(model_dir), "--state-dir", str(state_dir), *REQUIRED, "--quantize", "int4"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --quantize int4 cannot pack down_proj" in err
    assert "in_features 344" in err and "multiple of 32" in err and "use --quantize int8 or none" in err
    assert list(state_dir.iterdir()) == []  # no worker id, no usage spool: it never registered or served


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_worker_refuses_a_format_whose_kernels_this_torch_lacks_before_serving(
    fmt, tmp_path, monkeypatch, capsys
):
    """The CPU int4 kernels came with torch 2.6 (the project allows 2.5): a torch without an operator a
    format needs failed with an AttributeError traceback at the first packed weight."""
    from data_plane.model.quant.int4 import Int4Linear
    from data_plane.model.quant.int8 import Int8Linear

    linear = {"int4": Int4Linear, "int8": Int8Linear}[fmt]
    monkeypatch.setattr(linear, "required_ops", {"cpu": (*linear.required_ops["cpu"], "_no_such_kernel")})
    monkeypatch.delenv("OPENLORA_QUANTIZE", raising=False)
    model_dir = write_llama(tmp_path / "model", intermediate_size=128)
    state_dir = tmp_path / "state"
    # The patched operator list is this process's: the engine is built here (an engine core process would
    # import the real one).
    argv = ["worker", "--model", str(model_dir), "--state-dir", str(state_dir), *REQUIRED, "--quantize", fmt]
    code = main([*argv, "--engine-core", "thread"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: --quantize {fmt} on cpu needs torch.ops.aten._no_such_kernel" in err
    assert "Traceback" not in err and "install a newer torch" in err
    assert list(state_dir.iterdir()) == []  # it never registered or served


@pytest.mark.parametrize("value", ["foo", "tritonn"])
def test_worker_refuses_an_unknown_kernel_choice_before_starting(tmp_path, monkeypatch, capsys, value):
    """It was read first by a step: the worker started and answered every request INTERNAL."""
    message = f"OPENLORA_KERNELS must be one of auto, triton, reference, got {value!r}"
    env = {"OPENLORA_KERNELS": value}
    assert_refused_before_start(
        "worker", tmp_path, monkeypatch, capsys, [], env, message, ["OPENLORA_QUANTIZE"]
    )


def test_worker_refuses_triton_kernels_forced_on_the_cpu_before_starting(tmp_path, monkeypatch, capsys):
    """Without Triton's interpreter no Triton kernel runs on the CPU: the worker started, said SERVING and
    answered every request INTERNAL ("0 active drivers")."""
    message = "OPENLORA_KERNELS=triton needs --device cuda: on 'cpu' the Triton kernels run only under"
    env = {"OPENLORA_KERNELS": "triton", "TRITON_INTERPRET": "0"}
    assert_refused_before_start(
        "worker", tmp_path, monkeypatch, capsys, [], env, message, ["OPENLORA_QUANTIZE"]
    )


def test_triton_kernels_are_taken_on_the_cpu_under_tritons_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = worker_config_from_args(_parse(["worker", "--model", str(tmp_path), *REQUIRED]))
    assert config.engine.device == "cpu"


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_a_triton_without_knobs_is_asked_through_its_variable(monkeypatch, interpret):
    """Triton before 3.4 has no `triton.knobs` (pyproject admits 3.0): its interpreter was taken as off,
    and triton forced on the CPU refused even under TRITON_INTERPRET=1."""
    import sys

    import triton

    from openlora_kernels import triton_runs_on

    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert triton_runs_on("cpu") is (interpret == "1")
    assert triton_runs_on("cuda:0")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--num-adapter-slots", "0"],
            {},
            "argument --num-adapter-slots: must be a whole number in [1, 65536]",
        ),
        # A pool this large ended in the allocator's traceback (exit 1).
        (
            ["--num-adapter-slots", "100000000"],
            {},
            "argument --num-adapter-slots: must be a whole number in [1, 65536]",
        ),
        (
            ["--max-lora-rank", "100000000"],
            {},
            "argument --max-lora-rank: must be a whole number in [1, 4096]",
        ),
        (
            [],
            {"OPENLORA_HOST_CACHE_BYTES": "-5"},
            "argument --host-cache-bytes: OPENLORA_HOST_CACHE_BYTES must be a whole number in [0, 2^63-1]",
        ),
    ],
)
def test_worker_refusals_name_the_flag_and_variable(tmp_path, monkeypatch, capsys, argv, env, message):
    assert_refused_before_start(
        "worker", tmp_path, monkeypatch, capsys, argv, env, message, ["OPENLORA_QUANTIZE"]
    )


@pytest.mark.parametrize(
    ("command", "argv", "env", "message"),
    [
        (
            "worker",
            [],
            {"OPENLORA_MAX_NUM_SEQS": "lots"},
            "argument --max-num-seqs: OPENLORA_MAX_NUM_SEQS must be a whole number in [1, 2^63-1], written in "
            "ASCII digits, got 'lots'",
        ),
        # spaces are a malformed value, not an unset variable
        (
            "worker",
            [],
            {"OPENLORA_DISK_CACHE_BYTES": " "},
            "argument --disk-cache-bytes: OPENLORA_DISK_CACHE_BYTES must be a whole number in [0, 2^63-1], "
            "written in ASCII digits, got ' '",
        ),
        (
            "up",
            [],
            {"OPENLORA_DRAIN_GRACE_S": "soon"},
            "argument --drain-grace-s: OPENLORA_DRAIN_GRACE_S must be a number >= 0",
        ),
        (
            "worker",
            ["--max-waiting", "1.5"],
            {},
            "argument --max-waiting: must be a whole number in [1, 2^63-1], written in ASCII digits, got '1.5'",
        ),
    ],
)
def test_a_malformed_number_names_the_variable_it_came_from(
    tmp_path, monkeypatch, capsys, command, argv, env, message
):
    # argparse converts a variable's value as the flag's own and named only the flag
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    state_dir = tmp_path / "state"
    with pytest.raises(SystemExit) as stopped:
        main([command, "--state-dir", str(state_dir), *argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not state_dir.exists()
