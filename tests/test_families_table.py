"""The README's family table is generated from the family registry (tools/families_table.py) and current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table_tool():
    spec = importlib.util.spec_from_file_location("families_table", REPO / "tools" / "families_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_family_table_is_current(table_tool):
    readme = (REPO / "README.md").read_text()
    assert table_tool.updated_readme(readme) == readme, "run python tools/families_table.py"
    assert table_tool.main(["--check"]) == 0


def test_the_table_has_a_row_per_registered_family_read_from_its_class(table_tool, monkeypatch):
    from lorafit.families import registry
    from lorafit.families.flux import FluxFamily

    class Renamed(FluxFamily):
        name = "flux-test"
        title = "A family added to the registry"

    monkeypatch.setitem(registry._FAMILY_CLASSES, "flux-test", "x:Renamed")
    monkeypatch.setitem(registry._INSTANCES, "flux-test", Renamed())
    rows = table_tool.render_table().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{name}`" for name in registry.family_names()]
    added = rows[-1]
    assert "A family added to the registry" in added and "flow matching" in added
    assert "lora, loha, lokr, dora" in added and "locon" not in added  # the flow objective refuses LoCon
    assert "BFL names, q/k/v fused" in added and "`FluxPipeline.load_lora_weights`" in added
    sdxl = rows[0]
    assert "locon" in sdxl and "SGM block names" in sdxl and "11 samplers" in sdxl


def test_an_out_of_date_table_is_reported(table_tool, monkeypatch, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table_tool.START}\n| old |\n{table_tool.END}\nrest\n")
    monkeypatch.setattr(table_tool, "README", readme)
    assert table_tool.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert table_tool.main([]) == 0 and table_tool.main(["--check"]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")
