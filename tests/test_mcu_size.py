"""The default's whole exported edge (head, exit, quantizer, static code, wire) fits a small
Cortex-M4: built as benchmarks/mcu_size.py builds it (arm-none-eabi-gcc -Os, newlib-nano,
--gc-sections), at most 48 KiB of flash and 16 KiB of RAM, stack included (issue #26)."""

from __future__ import annotations

import re

import pytest

from benchmarks import mcu_size
from pipeline.export.export_c import H_FILE, export_c
from pipeline.export.export_edge import MODEL_H

WHY_NOT = mcu_size.missing()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no Cortex-M4 build: {WHY_NOT}")


@pytest.mark.parametrize("unfamiliar, flash_cap", [(False, mcu_size.DEFAULT_FLASH),
                                                   (True, mcu_size.DEFAULT_SCORED_FLASH)])
def test_the_defaults_whole_edge_fits_a_small_cortex_m4(default_layout, tmp_path, unfamiliar,
                                                        flash_cap):
    """48 KiB of flash without the unfamiliarity score (`export --no-unfamiliar`), 64 KiB
    with it (its 400 x 10 class means are 16 KB); 16 KiB of RAM either way."""
    export_c(default_layout, tmp_path, "float32", unfamiliar=unfamiliar)
    tables = (tmp_path / MODEL_H).read_text()
    entries = int(re.search(r"code_entry\[(\d+)\]", tables).group(1))
    assert entries == 400 * 16                 # the default's static code is in the build
    scored = re.search(r"#define SPLITEXIT_UNFAMILIAR (\d)", (tmp_path / H_FILE).read_text())
    assert scored and int(scored.group(1)) == unfamiliar
    size = mcu_size.measure(tmp_path)
    print(f"default edge{'' if unfamiliar else ' without the score'}, Cortex-M4 -Os: "
          f"{size.flash} B flash, {size.static_ram} B static RAM, {size.stack} B stack")
    assert size.flash > 2 * entries            # what the step reaches was linked, tables too
    assert size.stack_bounded and size.stack > 0
    assert size.flash <= flash_cap
    assert size.ram <= mcu_size.DEFAULT_RAM
