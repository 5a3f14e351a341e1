"""What finesam sets for the whole process (`finesam.process`), and only when asked.

`reuse_freed_memory` changes the whole process, so it is measured in real subprocesses: by the page faults
of allocating and filling a 64 MB tensor, ten times in a row (16384 fresh 4 KB pages each time without it).
With it, the heap first grows by a few such blocks (small allocations land between them) and then reuses one.
A `finesam` command sets it once its arguments are parsed: `--help` or a bad option leaves the process as it was.
"""

import platform
import subprocess
import sys

import pytest
from PIL import Image

from finesam.cli import main
from finesam.process import reuse_freed_memory

# the setting exists in glibc only; elsewhere reuse_freed_memory() must change nothing and say so
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

PAGES = 64 * 2**20 // 4096

SCRIPT = """
import resource
import torch
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    before = faults()
    torch.ones(64 * 2**20 // 4).sum()
    print(faults() - before)
"""

COMMAND = "import finesam.cli\ntry:\n    finesam.cli.main({argv})\nexcept SystemExit:\n    pass"

SETUPS = {
    "default": "",
    "reuse_freed_memory": f"import finesam\nassert finesam.reuse_freed_memory() is {GLIBC}",
    "finesam command": COMMAND.format(argv=["convert", "missing.pth", "--out", "x"]),  # parsed, then fails
    "finesam --help": COMMAND.format(argv=["--help"]),
    "finesam bad option": COMMAND.format(argv=["segment", "--nonsense"]),
    "finesam download": COMMAND.format(argv=["download", "no-such-model"]),  # no model in the process
}


def faults_of_large_tensors(setup: str) -> list[int]:
    script = SCRIPT.format(setup=setup)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return [int(line) for line in done.stdout.split()[-10:]]


@pytest.mark.parametrize("setup", ["default", "finesam --help", "finesam bad option", "finesam download"])
def test_large_tensors_fault_every_page_by_default(setup):
    assert min(faults_of_large_tensors(SETUPS[setup])) >= PAGES // 2


@pytest.mark.parametrize("setup", ["reuse_freed_memory", "finesam command"])
def test_large_tensors_reuse_freed_memory(setup):
    faults = min(faults_of_large_tensors(SETUPS[setup]))
    assert faults < PAGES // 16 if GLIBC else faults >= PAGES // 2


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="positive number of bytes"):
        reuse_freed_memory(0)


def test_pixel_limit_is_set_only_by_a_parsed_command(tmp_path, capsys):
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(SystemExit):
            main(["segment", "x.png", "--max-pixels", "5", "--nonsense"])
        assert saved == Image.MAX_IMAGE_PIXELS
        with pytest.raises(SystemExit):  # parsed; then the image is missing
            main(["segment", str(tmp_path / "x.png"), "--weights", "w", "--out", "o.png", "--max-pixels", "5"])
        assert Image.MAX_IMAGE_PIXELS == 5
    finally:
        Image.MAX_IMAGE_PIXELS = saved
