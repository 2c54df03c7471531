"""What start-up did: seconds per phase, bytes per device, programs compiled or loaded."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StartupReport:
  load_s: float = 0.0
  place_s: float = 0.0
  compile_s: float = 0.0
  warmup_s: float = 0.0
  programs: int = 0
  weight_bytes: int = 0
  device_weight_bytes: int = 0                                # what one device holds
  kv_bytes: int = 0                                           # all devices
  kv_pages: tuple = ()                        # (layers, pages per device) of each page space
  devices: int = 1
  padding: list = dataclasses.field(default_factory=list)
  layout: str = ""                                            # the weight rows' padding
  compiled: list = dataclasses.field(default_factory=list)   # one line per width
  cache: str = ""                                             # the executable cache's work
  attention: str = ""                                         # the attention backend used

  @property
  def total_s(self) -> float:
    return self.load_s + self.place_s + self.compile_s + self.warmup_s

  def lines(self) -> list[str]:
    out = [f"start-up {self.total_s:.1f}s: load {self.load_s:.1f}s, place {self.place_s:.1f}s, "
           f"compile {self.programs} programs {self.compile_s:.1f}s, warm-up {self.warmup_s:.1f}s",
           f"weights {self.weight_bytes / 2**20:.0f} MiB per engine (one resident copy each; "
           f"{self.device_weight_bytes / 2**20:.0f} MiB per device), KV pools "
           f"{self.kv_bytes / 2**20:.0f} MiB{self._kv_words()}"]
    if self.layout:
      out.append(self.layout)
    if self.cache:
      out.append(f"executable cache: {self.cache}")
    out.extend(self.compiled)
    for p in self.padding:
      out.append(f"width {p['width']}: {p['q_heads_per_device']} q / {p['kv_heads_per_device']} kv "
                 f"heads per device, padding +{100 * p['attn_proj_flops_extra']:.0f}% attention "
                 f"projection FLOPs, +{100 * p['kv_bytes_per_token_extra']:.0f}% KV bytes per token")
    return out

  @property
  def device_kv_bytes(self) -> int:
    """The KV pools one device holds (every device holds the same)."""
    return self.kv_bytes // max(1, self.devices)

  def _kv_words(self) -> str:
    """A hybrid model's pools per device: its global layers' and its sliding layers'."""
    if len(self.kv_pages) < 2:
      return ""
    (glob, pages), (local, local_pages) = self.kv_pages
    return (f" ({self.device_kv_bytes / 2**20:.1f} MiB per device: {len(glob)} global layers x "
            f"{pages} pages, {len(local)} sliding-window layers x {local_pages} pages)")
