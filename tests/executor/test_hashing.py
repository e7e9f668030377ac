"""Content hashes: what changes them and what does not."""

from pathlib import Path

import pytest

from sslpipe.executor.hashing import hash_code, hash_path


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_identical_folders_in_different_places_hash_the_same(tmp_path: Path) -> None:
    files = {"a.txt": "alpha", "sub/b.bin": "beta"}

    assert hash_path(_tree(tmp_path / "one", files)) == hash_path(_tree(tmp_path / "two", files))


def test_a_folder_hash_changes_with_a_file_content_or_a_file_name(tmp_path: Path) -> None:
    base = hash_path(_tree(tmp_path / "base", {"a.txt": "alpha"}))

    assert hash_path(_tree(tmp_path / "content", {"a.txt": "alphA"})) != base
    assert hash_path(_tree(tmp_path / "name", {"b.txt": "alpha"})) != base


def test_a_file_hashes_by_its_content_only(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("same", encoding="utf-8")
    (tmp_path / "y.txt").write_text("same", encoding="utf-8")

    assert hash_path(tmp_path / "x.txt") == hash_path(tmp_path / "y.txt")


def test_hashing_a_missing_path_says_which_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hash_path(tmp_path / "nowhere")


def test_code_hash_ignores_caches_and_dot_folders(tmp_path: Path) -> None:
    code = _tree(tmp_path / "code", {"main.py": "print(1)"})
    before = hash_code([code])

    _tree(code, {"__pycache__/main.cpython-311.pyc": "x", "old.pyc": "y", ".git/HEAD": "z"})

    assert hash_code([code]) == before


def test_code_hash_changes_when_any_code_folder_changes(tmp_path: Path) -> None:
    code = _tree(tmp_path / "code", {"main.py": "print(1)"})
    lib = _tree(tmp_path / "lib", {"util.py": "X = 1"})
    before = hash_code([code, lib])

    (lib / "util.py").write_text("X = 2", encoding="utf-8")

    assert hash_code([code, lib]) != before
