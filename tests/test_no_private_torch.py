"""The package uses public torch API only: a torch upgrade must not break it without an error."""

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# each with what it is
FORBIDDEN = {
    r"torch\._C\b": "torch's C bindings (private)",
    r"\b_C\._": "torch's C bindings reached by another name",
    r"_use_count\b": "a tensor's C++ reference count",
    r"\bgetrefcount\b": "Python reference counts",
    r"_FunctionBase\b": "autograd.Function.apply bypassed",
    r"graph_task": "the autograd engine's backward-pass ids",
    r"_storage_Use_Count\b": "a storage's reference count",
}


def test_src_uses_no_private_torch_internals():
    found = []
    for path in sorted(SRC.rglob("*")):
        if path.suffix not in (".py", ".cpp", ".h") or not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in FORBIDDEN.items():
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(SRC)}:{lineno}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_check_sees_a_forbidden_name(tmp_path):
    # the patterns match the uses they are meant for
    lines = [
        "torch._C._current_graph_task_id()",
        "x._use_count()",
        "sys.getrefcount(t)",
        'torch._C._FunctionBase.__dict__["apply"]',
    ]
    for line in lines:
        assert any(re.search(p, line) for p in FORBIDDEN), line
