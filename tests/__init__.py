"""Tests run on the CPU by default, also on a machine with a GPU; ``MQUANT_TEST_DEVICE=cuda`` runs
the end-to-end ones (models, inputs and the exam entry point) on a GPU instead."""
import os

DEVICE = os.environ.get("MQUANT_TEST_DEVICE", "cpu")


def main(family, argv):
    """The exam entry point on the test device (its own default would pick a GPU when present)."""
    from exam.common import main as exam_main

    return exam_main(family, ["--device", DEVICE, *argv])
