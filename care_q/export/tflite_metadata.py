"""TFLite model metadata for Android apps: normalisation and the label map, in the format that
TFLite Support and MediaPipe Tasks read (`metadata_schema.fbs`, file identifier ``M001``).

Android's ImageClassifier (TFLite Support / MediaPipe Tasks) reads from a ``.tflite``:

- the ``TFLITE_METADATA`` entry of the model's ``metadata`` list: a ``ModelMetadata``
  flatbuffer whose input tensor carries ``ImageProperties`` (RGB) and a ``NormalizationOptions``
  process unit (mean/std in 0..255 pixel units: ``(pixel - mean) / std``), and whose output
  tensor names an associated ``labels.txt`` of type ``TENSOR_AXIS_LABELS``;
- the associated files, packed as a zip archive appended to the flatbuffer (the model stays a
  valid flatbuffer; zip readers find the archive from its end).

Why written here: the maintained writers cannot be installed beside this project's pins
(`tflite-support` 0.4.4 requires protobuf < 4, onnx and ai-edge-litert need >= 4; MediaPipe
1.2.3's metadata writer fails to import: its wheel lacks `mediapipe.tasks.cc`'s metadata
module; MediaPipe 0.10.21 downgrades numpy and protobuf and pulls jax). The tables are built
with the `flatbuffers` runtime, slot by slot as the schema declares them.
"""

from __future__ import annotations

import io
import zipfile

import flatbuffers

from care_q.version import __version__

METADATA_NAME = "TFLITE_METADATA"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"
_FILE_ID = b"M001"

# enum values and union members of metadata_schema.fbs
_TENSOR_AXIS_LABELS = 2
_RGB = 1
_CONTENT_IMAGE_PROPERTIES = 2
_CONTENT_FEATURE_PROPERTIES = 1
_PROCESS_UNIT_NORMALIZATION = 1


def _strings(b: flatbuffers.Builder, items: dict[int, str | None]) -> dict[int, int]:
    return {slot: b.CreateString(s) for slot, s in items.items() if s is not None}


def _table(b: flatbuffers.Builder, n_slots: int, offsets: dict[int, int], scalars: dict[int, tuple[str, int]] | None = None
           ) -> int:
    """A table with uoffset fields ``offsets`` (slot -> offset) and scalar fields (slot -> (kind, value))."""
    b.StartObject(n_slots)
    for slot, (kind, value) in (scalars or {}).items():
        getattr(b, f"Prepend{kind}Slot")(slot, value, 0)
    for slot, off in offsets.items():
        b.PrependUOffsetTRelativeSlot(slot, off, 0)
    return b.EndObject()


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _floats(b: flatbuffers.Builder, values) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(list(values)):
        b.PrependFloat32(float(v))
    return b.EndVector()


def metadata_flatbuffer(*, name: str, description: str, version: str, input_name: str, output_name: str,
                        mean: tuple[float, ...], std: tuple[float, ...], labels: bool, author: str = "care-q") -> bytes:
    """The ``ModelMetadata`` flatbuffer (mean/std given in 0..1 units, as timm writes them)."""
    b = flatbuffers.Builder(1024)
    # input: an RGB image, normalised (pixel - 255 mean) / (255 std)
    norm = _table(b, 2, {0: _floats(b, [255.0 * m for m in mean]), 1: _floats(b, [255.0 * s for s in std])})
    unit = _table(b, 2, {1: norm}, {0: ("Uint8", _PROCESS_UNIT_NORMALIZATION)})
    image = _table(b, 2, {}, {0: ("Int8", _RGB)})
    content_in = _table(b, 3, {1: image}, {0: ("Uint8", _CONTENT_IMAGE_PROPERTIES)})
    s = _strings(b, {0: input_name, 1: "RGB image, NHWC"})
    tin = _table(b, 7, {**s, 3: content_in, 4: _vector(b, [unit])})
    # output: class scores (logits), labelled by labels.txt
    files = []
    if labels:
        fs = _strings(b, {0: LABELS_FILE, 1: "class names, one per line, in output order"})
        files.append(_table(b, 5, fs, {2: ("Int8", _TENSOR_AXIS_LABELS)}))
    feature = _table(b, 0, {})
    content_out = _table(b, 3, {1: feature}, {0: ("Uint8", _CONTENT_FEATURE_PROPERTIES)})
    s = _strings(b, {0: output_name, 1: "class logits (apply softmax for probabilities)"})
    tout = _table(b, 7, {**s, 3: content_out, **({6: _vector(b, files)} if files else {})})
    sub = _table(b, 10, {2: _vector(b, [tin]), 3: _vector(b, [tout])})
    s = _strings(b, {0: name, 1: description, 2: version, 4: author, 7: MIN_PARSER_VERSION})
    model = _table(b, 8, {**s, 3: _vector(b, [sub])})
    b.Finish(model, file_identifier=_FILE_ID)
    return bytes(b.Output())


def append_associated_files(model: bytes, files: dict[str, bytes]) -> bytes:
    """The model with ``files`` packed as a zip archive after it (as TFLite Support packs them)."""
    if not files:
        return model
    buf = io.BytesIO(model)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def labels_text(labels: list[str]) -> bytes:
    return ("\n".join(labels) + "\n").encode()


def app_metadata(pre, model_name: str, description: str, input_name: str, output_name: str
                 ) -> tuple[bytes, dict[str, bytes]]:
    """(``TFLITE_METADATA`` bytes, files to pack) for a checkpoint's preprocessing (`PreprocessConfig`):
    its mean/std, and its label names when the sidecar has them."""
    labels = list(pre.label_names) if pre.label_names else None
    meta = metadata_flatbuffer(name=model_name, description=description, version=f"care-q {__version__}",
                               input_name=input_name, output_name=output_name, mean=tuple(pre.mean),
                               std=tuple(pre.std), labels=labels is not None)
    return meta, ({LABELS_FILE: labels_text(labels)} if labels else {})


def read_metadata(model: bytes) -> dict:
    """What an app would read back: the metadata fields this module writes and the packed files."""
    from ai_edge_litert import schema_py_generated as fb

    m = fb.Model.GetRootAs(model, 0)
    entry = next((m.Metadata(i) for i in range(m.MetadataLength())
                  if m.Metadata(i).Name() == METADATA_NAME.encode()), None)
    if entry is None:
        return {}
    data = m.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    if flatbuffers.util.GetBufferIdentifier(data, 0) != _FILE_ID:
        raise ValueError("TFLITE_METADATA buffer without the M001 identifier")
    t = flatbuffers.table.Table(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))

    def field(tab, slot):
        o = tab.Offset(4 + 2 * slot)
        return o if o else None

    def string(tab, slot):
        o = field(tab, slot)
        return tab.String(o + tab.Pos).decode() if o else None

    def vec_tables(tab, slot):
        o = field(tab, slot)
        if not o:
            return []
        start, n = tab.Vector(o), tab.VectorLen(o)
        return [flatbuffers.table.Table(data, tab.Indirect(start + 4 * i)) for i in range(n)]

    def sub_table(tab, slot):
        o = field(tab, slot)
        return flatbuffers.table.Table(data, tab.Indirect(o + tab.Pos)) if o else None

    def floats(tab, slot):
        o = field(tab, slot)
        start, n = tab.Vector(o), tab.VectorLen(o)
        return [flatbuffers.encode.Get(flatbuffers.packer.float32, data, start + 4 * i) for i in range(n)]

    out = {"name": string(t, 0), "description": string(t, 1), "version": string(t, 2),
           "min_parser_version": string(t, 7)}
    sub = vec_tables(t, 3)[0]
    tin, tout = vec_tables(sub, 2)[0], vec_tables(sub, 3)[0]
    unit = vec_tables(tin, 4)[0]
    norm = sub_table(unit, 1)
    out["input"] = {"name": string(tin, 0), "mean": floats(norm, 0), "std": floats(norm, 1),
                    "normalization_type": unit.Get(flatbuffers.number_types.Uint8Flags, unit.Pos + field(unit, 0))}
    out["output"] = {"name": string(tout, 0), "files": [
        {"name": string(f, 0), "type": f.Get(flatbuffers.number_types.Int8Flags, f.Pos + field(f, 2))}
        for f in vec_tables(tout, 6)]}
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as z:
            out["packed_files"] = {n: z.read(n) for n in z.namelist()}
    except zipfile.BadZipFile:
        out["packed_files"] = {}
    return out
