"""Build hook: generate the gRPC Python stubs from protos/**/*.proto at install time.

Everything else about the package lives in pyproject.toml. The stubs are written next to their
.proto files (git ignores them), so both regular and editable installs import them; they are
never edited by hand. Re-run ``scripts/setup.sh`` (or ``pip install -e .``) after editing a proto.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        rel = proto.relative_to(ROOT).as_posix()
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            rel,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
