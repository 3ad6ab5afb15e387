"""Wheels for running the GPU suite on a machine that cannot download: what the recipes need beyond the packages
that machine's image already holds, for its Python (3.12, x86-64 manylinux), saved into ``.whl/``.

    python -m benchmarks.device_wheels                 # here, with network access to PyPI
    # there, in the repository, with .whl/ carried along:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 -m benchmarks.gpu_suite --part mae

pip resolves the needs of each package for the target platform; wheels of packages the image has already (its
list: ``ALREADY_THERE``) are removed again, as they would replace its own builds (torch above all). DeepSpeed is
published as source only: its wheel is built here without compiling any of its ops (they build at first use, and
the suite's strategies need none beyond what DeepSpeed JIT-builds on the GPU machine)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# What the recipes import that the GPU image lacks (the versions this project is tested with).
NEEDED = ("jsonargparse[signatures]==4.53.0", "webdataset==1.0.2", "braceexpand==0.1.7", "wandb==0.31.0",
          "pycocotools==2.0.11", "hjson==3.1.0")
SOURCE_ONLY = ("deepspeed==0.19.8",)
# The GPU image's packages (the device notes' list, 2026-11-17): their wheels are not carried.
ALREADY_THERE = set("""absl-py accelerate aiohttp annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle cuda-bindings filelock fsspec grpcio h11 httpcore httpx huggingface-hub idna jinja2 lightning
lightning-utilities markupsafe matplotlib msgpack networkx ninja numpy nvidia-ml-py opencv-python-headless packaging
pandas pillow pip protobuf psutil py-cpuinfo pygments pyparsing python-dateutil pytorch-lightning pyyaml regex
requests rich safetensors scikit-image scipy setuptools six sympy timm torch torchaudio torchmetrics torchvision tqdm
triton typing-extensions urllib3 wheel einops xxhash""".split())
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64")


def _project(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_wheels", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default=".whl", help="Folder for the wheels (git-ignored).")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)
    platform = [flag for p in PLATFORMS for flag in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platform, "-d", str(dest), *NEEDED], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                    *SOURCE_ONLY], check=True)
    kept = []
    for wheel in sorted(dest.glob("*.whl")):
        if _project(wheel) in ALREADY_THERE:
            wheel.unlink()
        else:
            kept.append(wheel)
    size = sum(w.stat().st_size for w in kept) / 2**20
    print(f"{len(kept)} wheels, {size:.1f} MiB, in {dest}/: " + ", ".join(_project(w) for w in kept))


if __name__ == "__main__":
    main()
