"""The project's layering, read from the source with `ast` (nothing is imported).

- Packages reach the FeedbackService's vocabulary through services/common/feedback.py,
  never sideways into services/feedback.
- The policy engine is transport-free: gRPC lives at the edges (server.py, the HTTP API).
- The list of feedback kinds is written once, in services/common/feedback.py's KINDS;
  every other list of kinds is derived from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from rlhf.v1 import feedback_pb2

from services.common import bus, datasets, feedback
from services.datasets import rules
from services.feedback import server

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "trainers")  # the platform's code (tests and bench may start a service)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, absolute, at any depth (functions included)."""
    return imports_in(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1]))


def imports_in(source: str, package: str) -> set[str]:
    """The modules `source` (a module of `package`) imports; `from x import y` counts as x and x.y."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules_under(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walker_sees_deferred_and_relative_imports():
    # The checks below are only as good as this: an import inside a function
    # and a relative import must both be found.
    source = "def f():\n    import grpc.aio\n\nfrom ..feedback import validation\nfrom . import rules\n"
    found = imports_in(source, "services.datasets")
    assert {"grpc.aio", "services.feedback.validation", "services.datasets.rules"} <= found
    assert is_within("services.feedback.validation", "services.feedback")
    assert not is_within("services.feedbacks", "services.feedback")


def test_no_package_imports_the_feedback_service_sideways():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if is_within(m, "services.feedback"))
        for path in modules_under(*PACKAGES)
        if not path.relative_to(ROOT).parts[:2] == ("services", "feedback")
    }
    offenders = {path: modules for path, modules in offenders.items() if modules}
    assert offenders == {}, "import the feedback vocabulary from services.common.feedback instead"


def test_the_policy_engine_imports_no_grpc():
    grpc_imports = sorted(m for m in imported_modules(ROOT / "services/policy/engine.py") if is_within(m, "grpc"))
    assert grpc_imports == [], "the engine reports StatusError outcomes; server.py maps them to gRPC codes"


def test_every_list_of_feedback_kinds_comes_from_the_registry():
    keys = list(feedback.KINDS)
    assert keys == ["prompts", "demonstrations", "comparisons", "labels"]
    assert list(datasets.KINDS) == keys
    assert [k for k in bus.TOPIC_TYPES if k in feedback.KINDS] == keys
    assert all(bus.TOPIC_TYPES[k] is feedback.KINDS[k].event_type for k in keys)
    assert sorted(server.UNARY_METHODS.values()) == sorted(keys)
    assert rules.ON_PROMPT == tuple(k for k in keys if k != "prompts")
    # The table covers the protos exactly: every unary RPC and every BulkItem field has one kind.
    service = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"]
    unary = {m.name for m in service.methods if not m.client_streaming}
    assert unary == set(feedback.BY_RPC)
    assert {f.name for f in feedback_pb2.BulkItem.DESCRIPTOR.oneofs_by_name["item"].fields} == set(
        feedback.BY_BULK_FIELD
    )
    for kind in feedback.KINDS.values():
        assert service.methods_by_name[kind.rpc].input_type is kind.request_type.DESCRIPTOR
        bulk_field = feedback_pb2.BulkItem.DESCRIPTOR.fields_by_name[kind.bulk_field]
        assert bulk_field.message_type is kind.request_type.DESCRIPTOR
        for name in kind.payload:  # copied request -> event as they are
            assert name in kind.request_type.DESCRIPTOR.fields_by_name
            assert name in kind.event_type.DESCRIPTOR.fields_by_name


def test_the_kind_names_are_written_once_in_the_code():
    # A literal (tuple, list, set, dict keys) naming three or more kinds is a
    # second list of them. A pair is an algorithm's choice (PPO draws prompts
    # from demonstrations and comparisons), not the vocabulary.
    names = set(feedback.KINDS)
    lists: dict[str, int] = {}
    for path in modules_under(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            elements = (
                node.elts
                if isinstance(node, ast.Tuple | ast.List | ast.Set)
                else node.keys
                if isinstance(node, ast.Dict)
                else []
            )
            written = {e.value for e in elements if isinstance(e, ast.Constant) and e.value in names}
            if len(written) >= 3:
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                lists[where] = len(written)
    assert lists == {}, "derive the list of kinds from services.common.feedback.KINDS"
