"""Each way a searchable conv can run its step, timed for every searchable conv of a network, against
the route `SearchableConv.cheapest_route` picks and a plain conv with batch normalisation.

  python -m bench.conv_routes --model=resnet50 --image_size=64 --batch_size=16
  python -m bench.conv_routes --model=mobilenet_v2 --image_size=96 --batch_size=32

For every distinct conv geometry (input size, channels, kernel, strides, width) of the supernet
`train.search` builds: the milliseconds of one weight step (gradients of the input, the kernel and the
affines) plus one architecture step (gradients of the input and the mixing weights) on a synthetic batch,
the median of `--calls`, for each route the conv can run; the same for a plain Conv2D + BatchNormalization
(weight step only) on each of the search step's two batches. Totals weigh each geometry by how many convs
share it. `picked_vs_fastest` is what the cost model's choices lose against the fastest route of each
conv: the check of `tas_keras.layers.ELEMENT_COST`. Writes bench/results/conv_routes_<model>.json.
Each call includes TensorFlow's dispatch, so small convs read slower than inside a whole step.
"""

import collections
import json
import os
import platform
import time

from absl import app, flags
import keras
import numpy as np
import tensorflow as tf

from tas_keras.layers import SearchableConv
from tas_keras.models.registry import build_model
from tas_keras.runs import write_json
from tas_keras.supernet import build_supernet

_MODEL = flags.DEFINE_string("model", "resnet50", "A registry name (a network the supernet reads).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input height and width (default: the registry's).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per batch (a search step takes two batches).")
_CALLS = flags.DEFINE_integer("calls", 40, "Timed calls per route and conv (the median is kept).")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/conv_routes_<model>.json).")


def _median_ms(step, inputs, calls):
    step(inputs)  # traces
    step(inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step(inputs)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _gradient_step(forward, variables):
    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = forward(inputs)
            loss = tf.reduce_sum(outputs * outputs)
        return tape.gradient(loss, [inputs, *variables])
    return step


def search_step_ms(conv, inputs, calls):
    """One weight step and one architecture step of `conv` (a built SearchableConv) on `inputs`."""
    top = len(conv.candidates) - 1
    picks, weights = tf.constant([top, top // 2]), tf.Variable([0.6, 0.4])

    def forward(x):
        return conv(x, picks, weights)[0]
    return (_median_ms(_gradient_step(forward, conv.trainable_weights), inputs, calls)
            + _median_ms(_gradient_step(forward, [weights]), inputs, calls))


def plain_step_ms(conv, inputs, calls):
    """A weight step of the plain conv (and BN when the searchable conv normalises) on `inputs`."""
    plain = keras.layers.Conv2D(conv.filters, conv.kernel_size, conv.strides, conv.padding,
                                dilation_rate=conv.dilation_rate, use_bias=conv.use_bias)
    batch_norm = keras.layers.BatchNormalization() if conv.normalize else None

    def forward(x):
        x = plain(x)
        return batch_norm(x, training=True) if batch_norm else x
    forward(inputs)
    variables = plain.trainable_weights + (batch_norm.trainable_weights if batch_norm else [])
    return _median_ms(_gradient_step(forward, variables), inputs, calls)


def main(argv):
    del argv
    name, batch, calls = _MODEL.value, _BATCH.value, _CALLS.value
    size = _IMAGE_SIZE.value
    keras.utils.set_random_seed(0)
    model = build_model(name, size and (size, size, 3), 10)
    supernet = build_supernet(name, model)
    geometries = collections.defaultdict(list)
    for conv in supernet.graph_layers.values():
        if isinstance(conv, SearchableConv):
            input_shape = tuple(model.get_layer(conv.name).input.shape[1:])
            geometries[(input_shape, conv.kernel_size, conv.strides, conv.filters, conv.normalize)].append(conv)
    rows, totals = [], collections.Counter()
    for (input_shape, kernel, strides, filters, _), convs in geometries.items():
        inputs = tf.random.stateless_normal((batch, *input_shape), [0, len(rows)])
        conv = convs[0]
        positions = conv.output_positions(inputs)
        picked = conv.cheapest_route(positions)
        times = {}
        for route in conv.routes:
            routed = SearchableConv.from_config({**conv.get_config(), "route": route, "name": f"{conv.name}_{route}"})
            routed(inputs, tf.constant([0, 0]), tf.constant([1.0, 0.0]))
            times[route] = round(search_step_ms(routed, inputs, calls), 2)
        plain = round(2 * plain_step_ms(conv, inputs, calls), 2)
        fastest = min(times, key=times.get)
        rows.append({"convs": [c.name for c in convs], "input_shape": list(input_shape), "kernel": list(kernel),
                     "strides": list(strides), "filters": filters, "positions": positions, "picked": picked,
                     "fastest": fastest, "search_ms": times, "plain_ms_two_batches": plain})
        totals["picked"] += len(convs) * times[picked]
        totals["fastest"] += len(convs) * times[fastest]
        totals["plain"] += len(convs) * plain
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": name, "image_size": size, "batch_size": batch, "calls": calls,
        "picked_ms": round(totals["picked"], 1), "fastest_ms": round(totals["fastest"], 1),
        "plain_ms": round(totals["plain"], 1),
        "picked_vs_fastest": round(totals["picked"] / totals["fastest"], 3),
        "picked_vs_plain": round(totals["picked"] / totals["plain"], 3),
        "convs": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}, Keras {keras.__version__}",
    }
    path = _OUT.value or os.path.join(os.path.dirname(__file__), "results", f"conv_routes_{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "convs"}, indent=2))


if __name__ == "__main__":
    app.run(main)
