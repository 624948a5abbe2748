"""The gradient-flow microscope: fused per-tensor, per-layer and residual-stream statistics, and diagnose.

Public API (docs/flow.md): FlowConfig, FlowMonitor, FlowRecord, FlowParquetWriter, read_flow, diagnose.
"""

from flowtrain.flow.config import FlowConfig
from flowtrain.flow.diagnose import Diagnosis, diagnose
from flowtrain.flow.hooks import DEPTH_STATS
from flowtrain.flow.monitor import FlowMonitor, default_layer_of
from flowtrain.flow.records import STAT_COLUMNS, FlowParquetWriter, FlowRecord, read_flow
from flowtrain.flow.stats import TENSOR_STATS

__all__ = [
    "DEPTH_STATS",
    "STAT_COLUMNS",
    "TENSOR_STATS",
    "Diagnosis",
    "FlowConfig",
    "FlowMonitor",
    "FlowParquetWriter",
    "FlowRecord",
    "default_layer_of",
    "diagnose",
    "read_flow",
]
