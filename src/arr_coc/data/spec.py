"""The task contract's tables (docs/tasks.md): the tasks, the character set of codes and values, the box
colours and the document labels. Both generators – the training one (`synthetic`) and the independently
written one used only for evaluation (`contract`) – read them from here; how each draws a page is its own."""

from __future__ import annotations

TASKS = ("box-codes", "doc-fields")
CHARSET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "orange": (240, 140, 20),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
    "brown": (140, 90, 40),
    "pink": (240, 100, 180),
    "gray": (128, 128, 128),
    "cyan": (20, 170, 190),
}
LABELS = (
    "Invoice", "Order", "Account", "Date", "Total", "Tax", "Customer", "Reference",
    "Serial", "Batch", "Route", "Gate", "Seat", "Room", "Code", "Plate",
)  # fmt: skip
