"""The one place that touches private Keras / TensorFlow APIs.

Keras 3 and TF 2 have no public way to (a) walk a functional model's layer graph from a layer to
the layers feeding it, (b) name the layer that produced a symbolic tensor, or (c) freeze a
concrete function's variables into constants.  Each of those is one function here, so a Keras or
TF upgrade that moves a private attribute breaks one module (and tests/test_tfcompat.py), not the
model code that uses it.
"""

from __future__ import annotations


def layer_calls(layer) -> list:
    """The recorded calls ("nodes") of `layer` in the functional model(s) it was built in, in order."""
    return list(layer._inbound_nodes)


def call_inputs(call) -> list:
    """The symbolic tensors a recorded call read."""
    return list(call.input_tensors)


def call_outputs(call) -> list:
    """The symbolic tensors a recorded call produced."""
    return list(call.output_tensors)


def call_arguments(call, tensors: dict) -> tuple[list, dict]:
    """(args, kwargs) of a recorded call, each symbolic input replaced by tensors[id(input)]:
    replays a functional graph onto new layers (batch-norm folding)."""
    return call.arguments.fill_in(tensors)


def inbound_layer_names(layer) -> list[str]:
    """Names of the layers whose outputs feed `layer` in its first call (its place in the
    functional model it was built in); [] for an Input layer."""
    calls = layer_calls(layer)
    return [producing_layer_name(t) for t in call_inputs(calls[0])] if calls else []


def producing_layer(tensor):
    """The layer that produced the symbolic Keras tensor `tensor` (e.g. a model output)."""
    return tensor._keras_history[0]


def producing_layer_name(tensor) -> str:
    """Name of the layer that produced the symbolic Keras tensor `tensor`."""
    return producing_layer(tensor).name


def freeze_function(concrete_fn):
    """`concrete_fn` (a tf.function's concrete function) with its variables turned into
    constants: a plain graph for FLOP counting, and the fastest forward pass (batch norm folds
    into the convolutions)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(concrete_fn)
