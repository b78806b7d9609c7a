"""Collects the fault matrix rows the tests of this folder record and prints the table at
the end of the run: fault x pipeline -> records in / out / rejected / lost / duplicated."""

from tests.faults.matrix import MATRIX, format_matrix, format_not_covered


def pytest_terminal_summary(terminalreporter):
    if MATRIX:
        terminalreporter.write_sep("=", "fault matrix")
        terminalreporter.write_line(format_matrix())
        terminalreporter.write_line(format_not_covered())
