"""Does the exported edge fit a microcontroller? Flash, static RAM and worst-case stack of
`splitexit export --target c` for every shipped config, built for a Cortex-M4 with `-Os`.

    python -m benchmarks.mcu_size                      # every shipped config, float32 and int8
    python -m benchmarks.mcu_size --configs default    # one config
    python -m benchmarks.mcu_size --tiny --artifacts DIR   # one trained folder, float32
    apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi   # the toolchain (Debian)

How it measures: the exported .c files are compiled (`arm-none-eabi-gcc -mcpu=cortex-m4
-mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -Os -ffunction-sections -fdata-sections`) and
linked with newlib-nano into a firmware whose main only keeps the header's functions
(`--gc-sections` drops what none of them reaches, as a device's link would). What the edge
adds is that firmware minus the same firmware without the edge: flash = .text + .rodata +
.data (+ exception tables), static RAM = .data + .bss. The stack is the deepest call path
from any exported function, from GCC's own per-function figures (`-fcallgraph-info=su`);
a path through a function of unknown (dynamic) stack is flagged.

Missing artifact folders (runs/NAME) are trained for one epoch on the first 1 000
Fashion-MNIST training frames (runs/mcu-size/): sizes depend on the shapes, not on the
weights; the int8 export calibrates on that slice.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import add_tiny, apply_tiny

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "pipeline" / "configs").glob("*.toml"))
CC = "arm-none-eabi-gcc"
CPU = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
COMPILE = [*CPU, "-Os", "-std=c99", "-Wall", "-Werror", "-ffunction-sections",
           "-fdata-sections", "-fcallgraph-info=su"]
LINK = [*CPU, "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections"]
FLASH_SECTIONS = (".text", ".rodata", ".data", ".ARM.exidx", ".ARM.extab")
RAM_SECTIONS = (".data", ".bss")
# The default's targets and every config's ceiling (issue #26). The default's unfamiliarity
# score (#29) adds 17.6 KB of tables: with it, the default fits a 64 KB part, not a 48 KB
# one; `splitexit export --no-unfamiliar` leaves it out.
DEFAULT_FLASH, DEFAULT_RAM = 48 * 1024, 16 * 1024
DEFAULT_SCORED_FLASH = 64 * 1024
FLASH_LIMIT, RAM_LIMIT = 256 * 1024, 64 * 1024


@dataclass
class Size:
    flash: int          # bytes the edge adds to a firmware image
    static_ram: int     # .data + .bss it adds
    stack: int          # deepest call path from an exported function
    stack_bounded: bool  # False: a function on some path has dynamic stack

    @property
    def ram(self) -> int:
        return self.static_ram + self.stack


def missing() -> str | None:
    """Why this machine cannot build for the Cortex-M4 (one line), or None: the compiler
    and newlib-nano (Debian: gcc-arm-none-eabi, libnewlib-arm-none-eabi)."""
    if shutil.which(CC) is None:
        return f"{CC} not found: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi"
    libc = subprocess.run([CC, *CPU, "-print-file-name=libc_nano.a"], capture_output=True,
                          text=True).stdout.strip()
    if not Path(libc).is_absolute():
        return "newlib-nano (libc_nano.a) not found: apt-get install libnewlib-arm-none-eabi"
    return None


def _functions(headers: list[Path]) -> list[str]:
    """The functions the exported headers declare (what a device calls)."""
    names = []
    for h in headers:
        text = re.sub(r"/\*.*?\*/", "", h.read_text(), flags=re.S)
        names += re.findall(r"^[A-Za-z_][\w ]*?\b(splitexit_\w+)\s*\(", text, flags=re.M)
    return sorted(set(names))


def _sections(elf: Path) -> dict[str, int]:
    out = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True,
                         text=True, check=True).stdout
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1])
    return sizes


def _stack(callgraphs: list[Path], roots: list[str]) -> tuple[int, bool]:
    """Deepest path (bytes) from any root through GCC's call graphs; whether all bounded."""
    own: dict[str, tuple[int, bool]] = {}
    calls: dict[str, set[str]] = {}
    for ci in callgraphs:
        text = ci.read_text()
        for title, label in re.findall(r'node: \{ title: "([^"]+)" label: "([^"]*)"', text):
            m = re.search(r"(\d+) bytes \(([^)]*)\)", label)
            if m:
                own[title] = (int(m.group(1)), "dynamic" not in m.group(2))
        for a, b in re.findall(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"', text):
            calls.setdefault(a, set()).add(b)

    def deepest(name: str, seen: frozenset) -> tuple[int, bool]:
        if name in seen:       # recursion: unbounded
            return 0, False
        size, bounded = own.get(name, (0, True))  # builtins and libc leaves: not ours
        below = [deepest(c, seen | {name}) for c in calls.get(name, ())]
        worst = max((b[0] for b in below), default=0)
        return size + worst, bounded and all(b[1] for b in below)

    paths = [deepest(r, frozenset()) for r in roots]
    return max(p[0] for p in paths), all(p[1] for p in paths)


class BuildError(RuntimeError):
    """The toolchain refused the exported C: its own last lines say why."""


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        tail = " / ".join(done.stderr.strip().splitlines()[-3:])
        raise BuildError(f"{Path(cmd[0]).name} failed: {tail}")


def measure(export_dir: Path) -> Size:
    """Build the exported C in `export_dir` for a Cortex-M4 and size what it adds."""
    sources = sorted(export_dir.glob("*.c"))
    headers = sorted(export_dir.glob("*.h"))
    functions = _functions(headers)
    if not sources or not functions:
        raise ValueError(f"{export_dir} holds no exported C (run splitexit export --target c)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        includes = "".join(f'#include "{h.name}"\n' for h in headers)
        keep = ", ".join(f"(void (*)(void)){f}" for f in functions)
        (work / "main.c").write_text(
            f"{includes}\nvoid (*volatile splitexit_keep[])(void) = {{{keep}}};\n"
            "int main(void) { return splitexit_keep[0] != 0; }\n")
        (work / "bare.c").write_text("int main(void) { return 0; }\n")
        objects = []
        for src in [*sources, work / "main.c"]:
            obj = work / (src.stem + ".o")
            _run([CC, *COMPILE, f"-I{export_dir}", "-c", str(src), "-o", str(obj)], work)
            objects.append(obj)
        _run([CC, *LINK, "-o", "edge.elf", *map(str, objects), "-lm"], work)
        _run([CC, *COMPILE, *LINK, "-o", "bare.elf", "bare.c"], work)
        edge, bare = _sections(work / "edge.elf"), _sections(work / "bare.elf")

        def added(names):
            return sum(edge.get(n, 0) - bare.get(n, 0) for n in names)

        stack, bounded = _stack(sorted(work.glob("*.ci")), functions)
        table = 4 * len(functions)  # main.c's keep table (.data) is ours, not the edge's
        return Size(added(FLASH_SECTIONS) - table, added(RAM_SECTIONS) - table, stack, bounded)


SHAPES_FRAMES = 1000


def _slice() -> Path:
    """The first SHAPES_FRAMES Fashion-MNIST training and test frames, as a data folder."""
    from pipeline.model.config import FASHION_MNIST_DIR
    from pipeline.floor.data import _find, read_idx, write_idx

    out = ROOT / "runs" / "mcu-size" / "data"
    if not (out / "t10k-labels-idx1-ubyte").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            write_idx(out / stem, read_idx(_find(Path(FASHION_MNIST_DIR), stem))[:SHAPES_FRAMES])
    return out


def _artifact(name: str) -> Path:
    run = ROOT / "runs" / name
    if (run / "edge.npz").is_file():
        return run
    shaped = ROOT / "runs" / "mcu-size" / name
    if not (shaped / "edge.npz").is_file():
        print(f"  training {name} for one epoch on {SHAPES_FRAMES} frames (its shapes) into "
              f"{shaped} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pipeline.cli", "train", name, "--epochs", "1",
                        "--data", str(_slice()), "--out", str(shaped), "--quiet"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return shaped


def _export(run: Path, variant: str, out: Path, unfamiliar: bool = True) -> str | None:
    """Export into `out`; None, or the one line saying why this variant does not export."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(run), "--target",
                           "c", "--variant", variant, "--out", str(out),
                           *([] if unfamiliar else ["--no-unfamiliar"])],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return (done.stderr.strip().splitlines() or ["export failed"])[-1]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--variants", nargs="+", default=["float32", "int8"])
    p.add_argument("--artifacts", type=Path,
                   help="measure this trained folder, as the one config --configs names")
    add_tiny(p)
    args = p.parse_args(argv)
    apply_tiny(p, args, configs=["default"], variants=["float32"])
    if args.artifacts and len(args.configs) != 1:
        p.error("--artifacts stands for one config: name it with --configs NAME")
    if why := missing():
        print(f"error: {why}", file=sys.stderr)
        return 2
    print(f"Cortex-M4, {CC} -Os, newlib-nano; what the exported edge adds to a firmware\n")
    print("| config | variant | flash KB | static RAM KB | stack KB | RAM KB | fits |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        run = args.artifacts or _artifact(name)
        for variant in args.variants:
            for unfamiliar in (True, False) if name == "default" else (True,):
                label = variant if unfamiliar else f"{variant}, --no-unfamiliar"
                _row(name, label, run, variant, unfamiliar)
    return 0


def _row(name: str, label: str, run: Path, variant: str, unfamiliar: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        why = _export(run, variant, Path(tmp), unfamiliar)
        if why:
            print(f"| {name} | {label} | - | - | - | - | not exported: {why} |")
            return
        try:
            s = measure(Path(tmp))
        except BuildError as e:
            print(f"| {name} | {label} | - | - | - | - | does not build: {e} |")
            return
    flash_cap, ram_cap = (FLASH_LIMIT, RAM_LIMIT) if name != "default" else (
        (DEFAULT_SCORED_FLASH if unfamiliar else DEFAULT_FLASH), DEFAULT_RAM)
    fits = "yes" if s.flash <= flash_cap and s.ram <= ram_cap else "NO"
    stack = f"{s.stack / 1024:.1f}" + ("" if s.stack_bounded else " (dynamic)")
    print(f"| {name} | {label} | {s.flash / 1024:.1f} | {s.static_ram / 1024:.1f} | "
          f"{stack} | {s.ram / 1024:.1f} | {fits} (<= {flash_cap // 1024} KB / "
          f"{ram_cap // 1024} KB) |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
