"""Exporting a checkpoint to ONNX and checking the export against PyTorch.

The exported graph takes raw uint8 pixels and does everything training did to them (see
lib.edge for the input contract), so a device feeds decoded pixels and nothing can drift.
The dynamo exporter writes one self-contained file (weights inside, no .data file) with a
dynamic batch axis.

Opsets and runtimes. torch 2.14's exporter writes opset 18 and up (its operator library starts
at 18). Opset 17 is the opset-18 graph rewritten operator by operator (downgrade): torch's own
conversion, onnx's version converter run before torch's optimiser has folded ReduceMean's axes
into constants, failed for every torchvision model tried (MobileNetV3, ShuffleNetV2,
EfficientNet, ConvNeXt). The exporter stamps IR version 10
whatever the opset, which every onnxruntime before 1.18 refuses. So the model is stamped with
the lowest IR version its opset needs (onnx.helper.VERSION_TABLE), and the oldest onnxruntime
that runs it goes into the metadata (min_onnxruntime), where predict.py checks it. The default
opset is the newest one that the oldest onnxruntime we test can run: 1.15.1, the oldest release
with a wheel for Python 3.11, loads opset 19 but has no kernel for Cast-19, so it runs opset 18
at most.
int8 quantization is lib.quantize's.
"""
import json

import numpy as np
import onnx
import torch
import torch.nn as nn

from lib import ensemble, weights
from lib.checkpoint import FORMAT, read_preprocessing
from lib.files import atomic_write
from lib.edge import INPUT_LAYOUT, METADATA_FORMAT
from lib.errors import UserError
from lib.inference import predict_probs, to_input
from lib.metrics import auroc

# The oldest onnxruntime that runs a model of each opset: onnxruntime's compatibility table
# (docs/reference/compatibility.md), except opset 19, which 1.15 loads but cannot run (no Cast-19).
RUNTIME_FOR_OPSET = {17: "1.12", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.18"}
DEFAULT_OPSET = 18
# tests/test_edge.py runs predict.py under this runtime when OLD_ORT_PYTHON names one (.ci/run does).
OLDEST_TESTED_ONNXRUNTIME = "1.15.1"
INPUT_NAME = "pixels"
EXPORTER_OPSET = 18  # the oldest opset torch's dynamo exporter writes without converting


class PixelClassifier(nn.Module):
    """uint8 (N, H, W, 3) RGB pixels -> probabilities (or logits), preprocessing included.

    The input step is lib.inference.to_input, the one every PyTorch prediction takes.
    """

    def __init__(self, network, mean, std, raw_logits=False):
        super().__init__()
        self.network = network
        self.raw_logits = raw_logits
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels):
        # Transpose while still uint8: 4x less memory to move, and nothing for the quantizer to touch.
        logits = self.network(to_input(pixels.permute(0, 3, 1, 2), self.mean, self.std))
        return logits if self.raw_logits else torch.softmax(logits, dim=1)


def model_metadata(checkpoint, checkpoint_sha256, raw_logits, opset, verification_images, gflop_per_image):
    """The model's metadata_props: strings, JSON where a value is not one.

    verification_images: where the images the export is verified on come from (data, split, count).
    classes, image_size, resize, mean, std, architecture and stem are the checkpoint's
    lib.preprocessing record, as lib.edge reads it back; the stem names the exact network (a
    max-pool has no weights);
    weights names the weights training started from (lib.weights.metadata: a file's path, or published
    weights' name and URL, with the sha256), null for random weights;
    ensemble: members, their seeds and how they are combined (lib.ensemble), null for one model;
    gflop_per_image is then the sum over the members.
    """
    lineage = checkpoint.get("lineage") or {}
    return {
        "format": METADATA_FORMAT,
        **read_preprocessing(checkpoint).onnx_metadata(),
        "input": INPUT_LAYOUT,
        "output": "logits" if raw_logits else "probabilities",
        "gflop_per_image": f"{gflop_per_image:.4f}",
        "ensemble": json.dumps(ensemble.metadata(checkpoint)),
        "source_checkpoint_sha256": checkpoint_sha256,
        "weights": json.dumps(weights.metadata(lineage)),
        "opset": str(opset),
        "min_onnxruntime": RUNTIME_FOR_OPSET[opset],
        "verification_images": json.dumps(verification_images),
        "toolkit_version": f"{FORMAT} (torch {torch.__version__}, onnx {onnx.__version__})",
    }


def set_metadata(model_proto, metadata):
    kept = [p for p in model_proto.metadata_props if p.key not in metadata]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        model_proto.metadata_props.add(key=key, value=value)


def stamp_metadata(path, metadata):
    """Add or replace metadata entries of the model file at `path`."""
    model_proto = onnx.load(str(path))
    set_metadata(model_proto, metadata)
    atomic_write(path, lambda tmp: onnx.save_model(model_proto, tmp))


def match_ir_version(model_proto):
    """Keep only the opsets the nodes use and stamp the lowest IR version they need: an old
    onnxruntime refuses a model that merely imports an opset or IR version newer than it knows."""
    used = {node.domain for node in model_proto.graph.node} | {""}
    kept = [o for o in model_proto.opset_import if o.domain in used]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend(kept)
    model_proto.ir_version = onnx.helper.find_min_ir_version_for(kept, ignore_unknown=True)


def check_and_save(model_proto, out):
    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"{out}: the model fails the ONNX check ({str(error).splitlines()[0]})") from None
    atomic_write(out, lambda tmp: onnx.save_model(model_proto, tmp))


def export_onnx(network, checkpoint, metadata, out, raw_logits=False, opset=DEFAULT_OPSET):
    """Export at `opset` to one self-contained file at `out` (atomically) after the full ONNX check."""
    size = checkpoint["image_size"]
    wrapper = PixelClassifier(network, checkpoint["mean"], checkpoint["std"], raw_logits).eval()
    # A batch of 2 as the example: torch.export specialises a dimension of size 1.
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    program = torch.onnx.export(
        wrapper, (example,), input_names=[INPUT_NAME],
        output_names=["logits" if raw_logits else "probabilities"],
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        opset_version=max(opset, EXPORTER_OPSET), external_data=False, dynamo=True, verbose=False)
    model_proto = program.model_proto
    if opset < EXPORTER_OPSET:
        model_proto = downgrade(model_proto, opset)
    written = next(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise UserError(f"--opset {opset}: the exporter could not convert the model (it wrote opset {written})")
    match_ir_version(model_proto)
    set_metadata(model_proto, metadata)
    check_and_save(model_proto, out)
    return wrapper


def downgrade(model_proto, opset):
    """The opset-18 graph torch writes at opset 17, operator by operator: of those opset 18
    changed, Split becomes Slices (Slice is the same in both), the Reduce operators take their
    constant axes input as the attribute opset 17 has, and attributes and inputs that 18 added
    go where they hold 18's default (ReduceMean's noop_with_empty_axes=0, an absent axes input of
    Pad), the older behaviour. Anything else (an operator new in 18, a setting 17 cannot express)
    is a UserError naming it; export.py verifies the result numerically. onnx's own version
    converter is not used: it has no adapter taking Split or Pad down from 18, and keeps
    ReduceMean's noop_with_empty_axes, which the opset-17 operator does not know."""
    model_proto = _split_as_slices(onnx.shape_inference.infer_shapes(model_proto))
    graph = model_proto.graph
    constants = _constants(graph)
    for node in graph.node:
        if node.domain in ("", "ai.onnx"):
            _downgrade_node(node, opset, constants)
    # The axes (and split sizes) now in attributes: onnxruntime warns about initializers nothing reads.
    used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for entry in model_proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    return model_proto


def _downgrade_node(node, opset, constants):
    """Rewrite one node of an opset-18 graph in place for `opset`; UserError where it cannot be."""
    def refuse(what):
        raise UserError(f"--opset {opset}: the graph's {node.op_type} {what}, which opset {opset} cannot express; "
                        f"--opset {EXPORTER_OPSET} needs onnxruntime >= {RUNTIME_FOR_OPSET[EXPORTER_OPSET]}")
    try:
        old = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        refuse(f"is new in opset {EXPORTER_OPSET}")
    new = onnx.defs.get_schema(node.op_type, EXPORTER_OPSET)
    if old.since_version == new.since_version:
        return
    if "axes" in old.attributes and "axes" not in new.attributes and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in constants:
            refuse("reduces over axes computed in the graph")
        node.attribute.append(onnx.helper.make_attribute("axes", [int(a) for a in constants[node.input[1]]]))
        del node.input[1:]
    for attribute in [a for a in node.attribute if a.name not in old.attributes]:
        default = new.attributes[attribute.name].default_value
        if not default.name or onnx.helper.get_attribute_value(attribute) != onnx.helper.get_attribute_value(default):
            refuse(f"sets {attribute.name}")
        node.attribute.remove(attribute)
    while len(node.input) > old.max_input and not node.input[-1]:
        del node.input[-1]
    if len(node.input) > old.max_input:
        refuse(f"takes input {len(node.input)} (new in opset {EXPORTER_OPSET})")


def _constants(graph):
    """{name: numpy array} of the graph's initializers and Constant nodes' values."""
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t) for node in graph.node
                      if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"})
    return constants


def _split_as_slices(model_proto):
    """Each Split node of the graph as one Slice per output, with constant starts, ends and axes.
    model_proto must carry inferred shapes (the split axis's length, where Split gives num_outputs)."""
    graph = model_proto.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info, *graph.output]}
    constants = _constants(graph)
    nodes = []
    for node in graph.node:
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis = attributes.get("axis", 0)
        if len(node.input) > 1 and node.input[1]:
            sizes = [int(v) for v in constants[node.input[1]]]
        else:
            length = shapes[node.input[0]][axis]
            chunk = -(-length // len(node.output))  # Split-18: equal parts, the last one smaller
            sizes = [min(chunk, length - i * chunk) for i in range(len(node.output))]
        starts = np.cumsum([0, *sizes[:-1]])
        for output, start, size in zip(node.output, starts, sizes):
            names = [f"{output}_{part}" for part in ("starts", "ends", "axes")]
            graph.initializer.extend(onnx.numpy_helper.from_array(np.array([value], np.int64), name)
                                     for name, value in zip(names, (start, start + size, axis)))
            nodes.append(onnx.helper.make_node("Slice", [node.input[0], *names], [output],
                                               name=f"{output}_slice"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model_proto


def to_nhwc(images):
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


def compare(reference, probs, labels, tolerance=None):
    """Differences of `probs` from the PyTorch `reference` probabilities (numpy, (N, C))."""
    row = {"max_abs_diff": float(np.abs(probs - reference).max()),
           "class_agreement": float((probs.argmax(1) == reference.argmax(1)).mean())}
    if labels is not None:
        labels = np.asarray(labels)
        row["accuracy"] = float((probs.argmax(1) == labels).mean())
        row["auroc"] = auroc(labels, probs) if len(np.unique(labels)) > 1 else float("nan")
    if tolerance is not None:
        row["within_tolerance"] = row["max_abs_diff"] <= tolerance
    return row


def verify(network, checkpoint, models, images, labels, big_batch=64, tolerance=1e-4):
    """PyTorch vs each ONNX model on the same images, at batch 1 and at `big_batch`.

    models: {name: (lib.edge.OnnxClassifier, held_to_tolerance)}; an int8 model is compared, not held.
    Returns ({row name: row}, {name: probabilities at big_batch}); the "pytorch" row holds the
    reference accuracy and AUROC.
    """
    reference = predict_probs(network, images, checkpoint["mean"], checkpoint["std"],
                              torch.device("cpu")).numpy()
    pixels = to_nhwc(images)
    rows, probs = {"pytorch": compare(reference, reference, labels)}, {}
    for name, (classifier, held_to_tolerance) in models.items():
        for batch in (1, big_batch):
            probs[name] = classifier.predict_proba(pixels, batch_size=batch)
            rows[f"{name} batch {batch}"] = compare(reference, probs[name], labels,
                                                     tolerance if held_to_tolerance else None)
    return rows, probs


def verification_table(rows):
    """verify()'s rows as a table for people: each model against PyTorch, and its scores."""
    reference = rows["pytorch"]
    lines = [f"{'model':<22}{'max |dp|':>10}{'agree':>8}{'accuracy':>10}{'AUROC':>8}{'dAUROC':>9}"]
    for name, row in rows.items():
        scores = (f"{row['accuracy']:>10.4f}{row['auroc']:>8.4f}{row['auroc'] - reference['auroc']:>+9.4f}"
                  if "accuracy" in row else "")
        lines.append(f"{name:<22}{row['max_abs_diff']:>10.2e}{row['class_agreement']:>8.4f}{scores}")
    return "\n".join(lines)


def optimize_for_runtime(path, out, config=None):
    """Save the graph onnxruntime runs after its optimisations (fusions) for this CPU.

    config: session configuration entries, e.g. {"session.qdqisint8allowed": "1"} for ARM's graph.
    """
    import onnxruntime as ort

    def write(tmp):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = tmp
        options.log_severity_level = 3  # its warning says what the docstring says: for this CPU only
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    atomic_write(out, write)
