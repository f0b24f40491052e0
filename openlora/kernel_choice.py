"""OPENLORA_KERNELS, read without importing torch (so that `up` checks it before it starts anything): which
implementation the LoRA and attention kernels take. `openlora_kernels.kernel_choice` reads it through here."""

from __future__ import annotations

from collections.abc import Mapping

from openlora.setting_rules import choice

KERNEL_CHOICES = ("auto", "triton", "reference")


def kernel_choice(environ: Mapping[str, str]) -> str:
    """OPENLORA_KERNELS checked (`setting_rules.choice`; empty: auto): "auto", "triton" or "reference"
    (ValueError naming the variable otherwise)."""
    try:
        return choice(environ.get("OPENLORA_KERNELS") or "auto", KERNEL_CHOICES)
    except ValueError as error:
        raise ValueError(f"OPENLORA_KERNELS {error}") from None


def triton_device_problem(device: str) -> str:
    """Why OPENLORA_KERNELS=triton cannot serve on `device` (a device the Triton kernels do not run on)."""
    return (
        f"OPENLORA_KERNELS=triton needs --device cuda: on {device!r} the Triton kernels run only under "
        "Triton's interpreter (TRITON_INTERPRET=1)"
    )
