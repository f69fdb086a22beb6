"""shared/paths.py: nothing a job names or finds on disk can lead it outside the allowed roots.

The escapes tried here are the ones that fool a lexical check: symlinks inside a root (to a file,
to a folder, to /proc/self/root), `..` after a symlink, sibling folders whose names extend the
root's, a root that is itself reached through a symlink, globs that wander out, and links added
to a folder after it was checked at submit time.
"""

from __future__ import annotations

import os

import pytest

from shared.paths import (
    PathEscapeError,
    confine,
    confine_files,
    confine_tree,
    resolve_existing_source,
    resolve_under_roots,
    safe_join,
)


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "secrets"
    sibling = tmp_path / "data-other"  # shares the root's name as a prefix
    for d in (root / "corpus", outside, sibling):
        d.mkdir(parents=True)
    (root / "corpus" / "a.txt").write_text("fine")
    (outside / "passwd").write_text("secret")
    (sibling / "b.txt").write_text("not ours")
    return root, outside, sibling


def test_plain_paths_inside_are_accepted(layout):
    root, _, _ = layout
    assert resolve_under_roots("corpus/a.txt", [root]) == (root / "corpus" / "a.txt").resolve()
    assert confine(root / "corpus" / "a.txt", [root]) == (root / "corpus" / "a.txt").resolve()
    assert confine_tree(root / "corpus", [root]) == (root / "corpus").resolve()
    assert resolve_existing_source("corpus/*.txt", [root]).name == "*.txt"


@pytest.mark.parametrize(
    "raw",
    [
        "../secrets/passwd",
        "corpus/../../secrets/passwd",
        "corpus/./../.././secrets/passwd",
        "../data-other/b.txt",  # a sibling whose name starts with the root's
        "/etc/passwd",
        "/proc/self/root/etc/passwd",  # the machine's / through procfs
    ],
)
def test_dotdot_and_prefix_tricks_are_refused(layout, raw):
    root, _, _ = layout
    with pytest.raises(PathEscapeError, match="outside the allowed data roots"):
        resolve_under_roots(raw, [root])


def test_symlink_to_a_file_outside_is_caught_at_the_file(layout):
    root, outside, _ = layout
    (root / "corpus" / "b.txt").symlink_to(outside / "passwd")
    with pytest.raises(PathEscapeError, match="b.txt"):
        confine(root / "corpus" / "b.txt", [root])
    # The folder itself lies inside the root: only a check of each file finds the link.
    assert resolve_under_roots("corpus", [root]) == (root / "corpus").resolve()
    with pytest.raises(PathEscapeError, match="b.txt"):
        confine_tree(root / "corpus", [root])
    with pytest.raises(PathEscapeError):
        confine_files(sorted((root / "corpus").iterdir()), [root])


def test_symlinked_folder_and_dotdot_after_a_link(layout):
    root, outside, _ = layout
    (root / "corpus" / "sub").symlink_to(outside)
    with pytest.raises(PathEscapeError):
        confine_tree(root / "corpus", [root])
    with pytest.raises(PathEscapeError):
        resolve_under_roots("corpus/sub/passwd", [root])
    # `..` applies after the link is followed (secrets/..), not lexically (corpus/): it lands in
    # the parent of the root, outside it.
    with pytest.raises(PathEscapeError):
        resolve_under_roots("corpus/sub/../data-other/b.txt", [root])


def test_link_through_procfs_is_caught(layout):
    root, _, _ = layout
    (root / "corpus" / "machine").symlink_to("/proc/self/root")
    with pytest.raises(PathEscapeError):
        confine(root / "corpus" / "machine" / "etc" / "hostname", [root])


def test_globs_may_not_wander_out(layout):
    root, outside, _ = layout
    (root / "corpus" / "leak.txt").symlink_to(outside / "passwd")
    with pytest.raises(PathEscapeError, match="leak.txt"):
        resolve_existing_source("corpus/*.txt", [root])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_existing_source("corpus/*.parquet", [root])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_existing_source("corpus/missing.txt", [root])


def test_root_reached_through_a_symlink(tmp_path, layout):
    root, outside, _ = layout
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert confine(alias / "corpus" / "a.txt", [alias]) == (root / "corpus" / "a.txt").resolve()
    with pytest.raises(PathEscapeError):
        confine(outside / "passwd", [alias])


def test_hardlinked_file_is_the_roots_own(layout):
    """A hard link inside a root is a file of that root (same inode, no path elsewhere to follow):
    whoever could create it could already read the target. Documented, not refused."""
    root, outside, _ = layout
    try:
        os.link(outside / "passwd", root / "corpus" / "hard.txt")
    except OSError:
        pytest.skip("no hard links on this filesystem")
    assert confine(root / "corpus" / "hard.txt", [root]) == (root / "corpus" / "hard.txt").resolve()


def test_safe_join(tmp_path):
    (tmp_path / "logs").mkdir()
    assert safe_join(tmp_path, "logs", "train.log") == (tmp_path / "logs" / "train.log").resolve()
    for bad in ("../x", "/etc/passwd", "logs/../../x"):
        with pytest.raises(PathEscapeError):
            safe_join(tmp_path / "logs", bad)
    (tmp_path / "logs" / "out").symlink_to("/etc")
    with pytest.raises(PathEscapeError):
        safe_join(tmp_path / "logs", "out/passwd")


def test_spec_refuses_missing_and_escaping_paths(layout):
    from pydantic import ValidationError

    from shared.jobs.spec import JobSpec

    root, outside, _ = layout
    (root / "link.jsonl").symlink_to(outside / "passwd")
    ctx = {"roots": [root]}
    for data, field in [
        ({"data": {"source": "local", "path": "nope"}}, "data.path"),
        ({"data": {"source": "local", "path": "link.jsonl"}}, "data.path"),
        ({"sft": {"sources": [{"kind": "conversations", "path": "link.jsonl"}]}}, "sft.sources.0.path"),
        ({"sft": {"sources": [{"kind": "conversations", "path": "missing.jsonl"}]}}, "sft.sources.0.path"),
    ]:
        with pytest.raises(ValidationError) as ei:
            JobSpec.model_validate(data, context=ctx)
        assert ".".join(map(str, ei.value.errors()[0]["loc"])) == field
    assert (
        JobSpec.model_validate({"data": {"source": "local", "path": "corpus"}}, context=ctx).data.path
        == "corpus"
    )
    # A spec read back from the registry is not checked against the filesystem again.
    JobSpec.from_stored({"data": {"source": "local", "path": "nope"}})
