"""The organ table of a case: one row per organ with its predicted Dice and surface Dice, their
conformal intervals and coverage, and the readable line ("Mandible: Dice 0.81 [0.72, 0.88], surface
Dice (3 mm) 0.90 [0.80, 0.97], 90 %"), from summary.json's ``organ_quality`` block
(``report.guarantees.organ_rows``). Takes the scene as an argument; None for a case without the block.
"""

from __future__ import annotations

from ..report.guarantees import organ_rows

COLUMNS = (("organ", "string"), ("Dice", "double"), ("Dice lower", "double"), ("Dice upper", "double"),
           ("surface Dice", "double"), ("surface Dice lower", "double"), ("surface Dice upper", "double"),
           ("coverage %", "double"), ("status", "string"), ("line", "string"))
_KEYS = ("organ", "dice", "dice_lower", "dice_upper", "surface_dice", "surface_dice_lower", "surface_dice_upper",
         "coverage", "status", "text")


def table_values(summary: dict) -> list[list]:
    """The table's rows as Python values (None where an organ has no interval; coverage in %)."""
    out = []
    for r in organ_rows(summary):
        row = [r[k] for k in _KEYS]
        row[7] = None if r["coverage"] is None else round(100.0 * r["coverage"], 6)
        out.append(row)
    return out


def add_organ_table(scene, summary: dict, name: str):
    """A locked vtkMRMLTableNode of the organ quality (added to ``scene``), or None without it."""
    import slicer
    import vtk

    rows = table_values(summary)
    if not rows:
        return None
    node = slicer.vtkMRMLTableNode()
    node.SetName(name)
    scene.AddNode(node)
    table = node.GetTable()
    for title, kind in COLUMNS:
        col = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
        col.SetName(title)
        table.AddColumn(col)
    table.SetNumberOfRows(len(rows))
    for i, row in enumerate(rows):
        for j, ((_, kind), v) in enumerate(zip(COLUMNS, row)):
            table.SetValue(i, j, vtk.vtkVariant(("" if v is None else str(v)) if kind == "string"
                                                else (float("nan") if v is None else float(v))))
    node.SetColumnUnitLabel("coverage %", "%")
    node.SetAttribute("CalibU.Role", "organ_quality")
    node.SetLocked(True)
    node.Modified()
    return node
