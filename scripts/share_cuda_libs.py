"""Hard-link the CUDA library distributions of one virtualenv into another before pip fills it.

The vLLM venv and the SGLang venv each need a CUDA build of torch (PyPI has no other with torchvision),
and the two torch releases pull mostly the same nvidia-*/cuda-* wheels, about 2 GB of identical files.
Linked in beforehand, pip finds those distributions installed and keeps the ones that satisfy torch's
pins; it replaces the others (unlinking only the second name, so the first venv is untouched). This is
what let the test set-up fit on CI machines with little free disk. Nothing is done, with one line saying
why, where hard links are impossible or the venvs differ in Python version.

    python scripts/share_cuda_libs.py FROM_VENV TO_VENV
"""
import csv
import os
import sys
from pathlib import Path

SHARED_PREFIXES = ("nvidia_", "cuda_")  # dist-info names: nvidia_cublas-13.1.1.3.dist-info, cuda_bindings-...


def site_packages(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    return found[0] if len(found) == 1 else None


def recorded_files(dist_info: Path) -> list[str]:
    with open(dist_info / "RECORD", newline="") as f:
        names = [row[0] for row in csv.reader(f) if row and not row[0].startswith("..")]
    # the metadata last: a link that fails midway must not leave a distribution pip takes as installed
    return sorted(names, key=lambda name: name.startswith(dist_info.name + "/"))


def main(source_venv: str, target_venv: str) -> int:
    source, target = site_packages(Path(source_venv)), site_packages(Path(target_venv))
    if source is None or target is None or source.parent.name != target.parent.name:
        print(f"not sharing CUDA libraries: {source_venv} and {target_venv} are not venvs of one Python")
        return 0
    linked_bytes = 0
    for dist_info in sorted(source.glob("*.dist-info")):
        if not dist_info.name.lower().startswith(SHARED_PREFIXES):
            continue
        if (target / dist_info.name).exists():
            continue
        for name in recorded_files(dist_info):
            src, dst = source / name, target / name
            if not src.is_file() or dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError as e:  # another file system, or links not allowed: pip installs copies instead
                print(f"not sharing CUDA libraries ({e.strerror}: {src} -> {dst})")
                return 0
            linked_bytes += src.stat().st_size
    print(f"shared {linked_bytes / 2**30:.1f} GiB of CUDA libraries with {source_venv} (hard links)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
