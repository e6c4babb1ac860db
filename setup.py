"""Ships ``pat_sglang.pth`` at the root of the wheel (site-packages), which pyproject.toml alone cannot express."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        shutil.copy(os.path.join(here, "pat_sglang.pth"), os.path.join(self.build_lib, "pat_sglang.pth"))


setup(cmdclass={"build_py": BuildPyWithPth})
