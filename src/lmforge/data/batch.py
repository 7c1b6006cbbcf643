"""The batch conventions every data source and objective agree on (data/ writes them, train/ reads them).

labels[i] == IGNORE_INDEX    # token i is not a target (prompt, padding): no loss on it
batch[COUNT]                 # optional per-row units the loss is normalised by (DPO: one per pair)
"""

from __future__ import annotations

IGNORE_INDEX = -100  # the value torch's cross_entropy skips by default
# Optional batch key: per-row units the loss is normalised by when they are not target tokens
# (DPO: one per preference pair). Absent = count the target tokens.
COUNT = "count"
