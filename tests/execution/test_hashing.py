"""Content hashes: what changes them and what does not."""

from pathlib import Path

import pytest

from sslpipe.execution.hashing import hash_code, hash_path, iter_files


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


def test_an_edit_under_a_symlinked_folder_changes_the_hash(tmp_path: Path) -> None:
    shared = _tree(tmp_path / "shared", {"labels.json": '{"a": 1}'})
    data = _tree(tmp_path / "data", {"manifest.csv": "id\n1\n"})
    (data / "labels").symlink_to(shared, target_is_directory=True)
    before = hash_path(data)

    (shared / "labels.json").write_text('{"a": 2}', encoding="utf-8")

    assert hash_path(data) != before
    copy = _tree(tmp_path / "copy", {"manifest.csv": "id\n1\n", "labels/labels.json": '{"a": 2}'})
    assert hash_path(data) == hash_path(copy)  # a link hashes as what it points at


def test_a_symlink_cycle_is_walked_once(tmp_path: Path) -> None:
    data = _tree(tmp_path / "data", {"sub/a.txt": "alpha"})
    (data / "sub" / "back").symlink_to(data, target_is_directory=True)  # data/sub/back -> data
    (data / "self").symlink_to(data / "sub", target_is_directory=True)  # data/self -> data/sub

    names = [name for name, _ in iter_files(data)]

    assert names == ["self/a.txt", "sub/a.txt"]  # finite: no walk back into a walked folder
    assert hash_path(data) == hash_path(data)


def test_code_under_a_symlinked_folder_is_part_of_the_code_hash(tmp_path: Path) -> None:
    library = _tree(tmp_path / "library", {"util.py": "X = 1"})
    code = _tree(tmp_path / "code", {"main.py": "print(1)"})
    (code / "lib").symlink_to(library, target_is_directory=True)
    before = hash_code([code])

    (library / "util.py").write_text("X = 2", encoding="utf-8")

    assert hash_code([code]) != before
