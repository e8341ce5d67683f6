"""The private Keras / TF APIs behind landmarks.delg.tfcompat still answer as the model code expects."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _model():
    import keras

    inp = keras.Input((16, 16, 3), name="image")
    a = keras.layers.Conv2D(4, 3, name="conv_a")(inp)
    b = keras.layers.Conv2D(4, 1, name="conv_b")(inp)
    c = keras.layers.Add(name="merge")([keras.layers.Cropping2D(1, name="crop")(b), a])
    return keras.Model(inp, [c, a], name="small")


def test_layer_graph_walk():
    from landmarks.delg.tfcompat import inbound_layer_names, producing_layer_name

    net = _model()
    parents = {layer.name: inbound_layer_names(layer) for layer in net.layers}
    assert parents["image"] == []
    assert parents["conv_a"] == ["image"] and parents["conv_b"] == ["image"]
    assert parents["crop"] == ["conv_b"]
    assert parents["merge"] == ["crop", "conv_a"]
    assert [producing_layer_name(t) for t in net.outputs] == ["merge", "conv_a"]


def test_freeze_function_keeps_the_output():
    import tensorflow as tf

    from landmarks.delg.tfcompat import freeze_function

    net = _model()
    fn = tf.function(lambda x: net(x, training=False)[0])
    cf = fn.get_concrete_function(tf.TensorSpec([1, 16, 16, 3], tf.float32))
    frozen = freeze_function(cf)
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(frozen(x)[0]), np.asarray(cf(x)), rtol=1e-5, atol=1e-5)
    ops = {op.type for op in frozen.graph.get_operations()}
    assert not ops & {"VarHandleOp", "ReadVariableOp"}  # variables became constants
