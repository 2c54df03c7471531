"""Every notebook runs headless, top to bottom, on the CPU mesh, and shows what it promises."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"

EXPECT = {
    "quickstart": ["cpu 8 devices", "Paris", "-> 1  (load:busy", "-> 8  (load:quiet"],
    "serving": ["cpu 8 devices", "Paris", "flying_request_success_total", "partition: 8",
                "stopped; no page leaked: True"],
    "simulate": ["P90 TTFT under bursts", "4.79x", "Max context (KV tokens)", "| static:1 |",
                 "| static:8 |", "| auto |"],
}


def outputs_text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      parts.append(out.get("text", ""))
      for key in ("text/plain", "text/markdown"):
        parts.append(out.get("data", {}).get(key, ""))
  return "\n".join(parts)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_notebook_runs(name, monkeypatch):
  # the kernel starts without this session's device flags: the notebook's first cell sets them
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  # every cell runs for real, on the smaller workload the notebooks offer (fewer requests, tokens
  # and simulated seconds; the same burst)
  monkeypatch.setenv("FLYING_JAX_NOTEBOOK_SMALL", "1")
  path = NOTEBOOKS / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "commit notebooks without outputs"
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  text = outputs_text(nb)
  for expected in EXPECT[name]:
    assert expected in text, (name, expected)
