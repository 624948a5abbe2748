"""The TensorBoard sink's event files: real TensorBoard files whose every record checksum is the one TensorBoard's
own (pure-Python) CRC-32C gives, with the C checksum the sink puts in its record writer."""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc
from tensorboard.summary.writer import record_writer

from flowtrain.sinks.tensorboard import TensorBoardSink, fast_record_checksum


def records_of(path):
    """(header, header crc, data, data crc) of every record of a TFRecord file, as TensorBoard frames them."""
    raw, at, out = path.read_bytes(), 0, []
    while at < len(raw):
        header = raw[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[at + 8 : at + 12])
        data = raw[at + 12 : at + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[at + 12 + length : at + 16 + length])
        out.append((header, header_crc, data, data_crc))
        at += 16 + length
    assert at == len(raw)
    return out


def test_the_c_checksum_is_in_place_and_every_record_checks_with_tensorboards_own(tmp_path):
    sink = TensorBoardSink(tmp_path)
    assert sink.checksum == "c" and record_writer.masked_crc32c is not reference_crc
    for step in range(1, 4):
        sink.write(step, {"loss": 3.0 / step, "lr": 1e-3, "clipped": True, "name": "not a number"})
    sink.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    records = records_of(events)
    assert len(records) == 4  # the file version event, then one event a step
    for header, header_crc, data, data_crc in records:
        assert header_crc == reference_crc(header) and data_crc == reference_crc(data)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert "clipped" not in acc.Tags()["scalars"]  # booleans and strings are not scalars here


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_the_c_checksum_equals_tensorboards_on_any_bytes(data):
    assert fast_record_checksum() == "c"
    assert record_writer.masked_crc32c(data) == reference_crc(data)
