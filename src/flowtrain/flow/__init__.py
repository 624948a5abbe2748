"""The gradient-flow microscope: per-tensor, per-layer and residual-stream statistics, and diagnose.

Public API (docs/flow.md): FlowConfig, FlowMonitor, FlowRecord, FlowParquetWriter, read_flow, diagnose.
"""

from flowtrain.flow.config import FlowConfig
from flowtrain.flow.diagnose import Diagnosis, diagnose
from flowtrain.flow.monitor import FlowMonitor, default_layer_of
from flowtrain.flow.records import DEPTH_STATS, STAT_COLUMNS, TENSOR_STATS, FlowParquetWriter, FlowRecord, read_flow

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
