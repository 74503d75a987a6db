"""services/common/files.py: a write that replaces a file whole."""

from services.common.files import write_text_atomic


def test_write_text_atomic_creates_parents_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "result.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]
