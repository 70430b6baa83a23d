"""The builtin tiny tagger is the same bytes in every process (its identity is part of the tag fingerprint)."""
from __future__ import annotations

import hashlib
import subprocess
import sys

from tests.tag.conftest import REAL_CSV


def test_the_tiny_tagger_weights_are_the_same_bytes_in_two_processes(tmp_path):
    # safetensors writes metadata in hash-map order, which differs between processes unless sorted
    digests = []
    for k in range(2):
        code = ("import sys; from pathlib import Path; from tasks.tag.tiny import write_tagger_folder; "
                "write_tagger_folder(Path(sys.argv[1]), Path(sys.argv[2]), 0, with_onnx=False)")
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(k)), str(REAL_CSV)], check=True, timeout=120)
        digests.append(hashlib.sha256((tmp_path / str(k) / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
