"""Run untrusted programs (model-written code) in limited, isolated child processes (design.md,
Contract 5; docs/sandbox.md). Imports nothing else of denser: tasks sit above it."""

from denser.sandbox.harness import (
    CaseResult,
    TestCase,
    TestReport,
    outputs_equal,
    run_function_tests,
    run_io_tests,
    values_equal,
)
from denser.sandbox.runner import (
    STATUSES,
    Capabilities,
    Limits,
    Program,
    Result,
    capabilities,
    default_workers,
    run_program,
    run_programs,
)

__all__ = [
    "STATUSES",
    "CaseResult",
    "TestCase",
    "TestReport",
    "outputs_equal",
    "run_function_tests",
    "run_io_tests",
    "values_equal",
    "Capabilities",
    "Limits",
    "Program",
    "Result",
    "capabilities",
    "default_workers",
    "run_program",
    "run_programs",
]
