"""The network path never unpickles: no pickle, marshal or torch.load in the modules that touch wire bytes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NETWORK_MODULES = ["shared/messages.py", "shared/chunking.py", "shared/transport.py", "shared/updates.py"]
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}


@pytest.mark.parametrize("path", NETWORK_MODULES)
def test_no_unpickling_on_the_network_path(path: str) -> None:
    tree = ast.parse((REPO / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_IMPORTS, path
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in FORBIDDEN_IMPORTS, path
        elif isinstance(node, ast.Attribute) and node.attr == "load":
            base = node.value
            assert not (isinstance(base, ast.Name) and base.id in ("torch", "np", "numpy")), \
                f"{path}:{node.lineno}: {base.id}.load on network bytes"


@pytest.mark.parametrize("path", ["shared/messages.py", "shared/chunking.py"])
def test_protocol_and_chunking_are_pure(path: str) -> None:
    text = (REPO / path).read_text()
    assert "paho" not in text and "import socket" not in text
