"""Package list for setuptools (metadata lives in pyproject.toml). The repository root is the package `lowbit`,
so its subpackages are discovered here rather than listed by hand: a new folder with an __init__.py is in the
wheel without anyone remembering to add it."""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SUBPACKAGES = find_packages(where=".", exclude=["tests", "tests.*"])


class BuildPy(build_py):
    """This file sits in the package's own folder: keep it out of the wheel (`lowbit.setup` is no module)."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if (m[0], m[1]) != ("lowbit", "setup")]


setup(packages=["lowbit"] + [f"lowbit.{name}" for name in SUBPACKAGES], package_dir={"lowbit": "."},
      cmdclass={"build_py": BuildPy})
