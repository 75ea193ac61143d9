"""Step-level trajectory inspection: per-step records written during training, and an HTML report.

``records``: one record per agent step (action, observation, r_k, V(s_k), A_k, R_k, ratio) and the
writer that dumps them to ``RUN_DIR/steppo_steps/``. ``report``: ``python -m steppo_verl.inspect
RUN_DIR --out report.html`` renders them into one self-contained HTML file.
"""

from steppo_verl.inspect.records import (
    RECORD_SCHEMA,
    DumpConfig,
    TrajectoryBatch,
    dump_step_records,
    read_step_records,
    rows_to_dump,
    step_records,
    write_step_records,
)
from steppo_verl.inspect.report import build_report, render_report

__all__ = [
    "RECORD_SCHEMA",
    "DumpConfig",
    "TrajectoryBatch",
    "build_report",
    "dump_step_records",
    "read_step_records",
    "render_report",
    "rows_to_dump",
    "step_records",
    "write_step_records",
]
