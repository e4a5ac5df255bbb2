"""The NVMe tier's directory: private modes, its key, a path that cannot be used, one
open tier per directory."""

from __future__ import annotations

import pytest

from kvstore.errors import StorageError, StoreClosedError
from kvstore.tiers.nvme import NvmeTier
from tests.conftest import make_key
from tests.tiers.nvme.disk import config, directory_key


def test_directory_and_files_are_private(tmp_path):
    path = tmp_path / "nvme"
    path.mkdir(mode=0o755)
    (path / "seg-0000000001.log").touch(mode=0o644)  # left by an older kvstore
    with NvmeTier(config(path)) as tier:
        assert tier.put(make_key(1), b"secret")
        tier.flush()
    assert path.stat().st_mode & 0o777 == 0o700
    for entry in path.iterdir():
        assert entry.stat().st_mode & 0o777 == 0o600, entry.name


def test_nvme_path_that_is_a_file_is_refused_by_name(tmp_path):
    path = tmp_path / "not-a-directory"
    path.write_bytes(b"x")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        NvmeTier(config(path))


def test_a_damaged_key_file_is_refused(tmp_path):
    directory_key(tmp_path)
    (tmp_path / "KEY").write_bytes(b"short")
    with pytest.raises(StorageError, match="KEY is damaged"):
        NvmeTier(config(tmp_path))


def test_unusable_directory_and_double_open(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError):
        NvmeTier(config(tmp_path / "file" / "nvme"))
    tier = NvmeTier(config(tmp_path / "d"))
    with pytest.raises(StorageError):
        NvmeTier(config(tmp_path / "d"))
    tier.close()
    tier.close()
    with pytest.raises(StoreClosedError):
        tier.get(make_key(1))
    with pytest.raises(StoreClosedError):
        tier.put(make_key(1), b"v")
    NvmeTier(config(tmp_path / "d")).close()  # the lock went with close()
