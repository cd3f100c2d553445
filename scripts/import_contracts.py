"""A custom import-linter contract: test modules never import other test modules (rule 10 of
ARCHITECTURE.md). Shared test code lives in ``tests/helpers`` or a ``conftest.py``.

A test module is one whose last name component starts with ``test_``."""

from __future__ import annotations

import grimp
from importlinter.application import output
from importlinter.domain.contract import Contract, ContractCheck


def _is_test_module(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("test_")


class TestModulesIndependentContract(Contract):
    """Kept when no ``test_*`` module imports another ``test_*`` module (directly)."""

    type_name = "test_modules_independent"

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        tests = {m for m in graph.modules if _is_test_module(m)}
        links = sorted(
            (importer, imported)
            for importer in tests
            for imported in graph.find_modules_directly_imported_by(importer)
            if imported in tests
        )
        return ContractCheck(kept=not links, metadata={"links": links})

    def render_broken_contract(self, check: ContractCheck) -> None:
        output.print_error("Test modules import other test modules:", bold=False)
        output.new_line()
        for importer, imported in check.metadata["links"]:
            output.print_error(f"- {importer} -> {imported}", bold=False)
        output.new_line()
        output.print("Move the shared code to tests/helpers/ or a conftest.py.")
