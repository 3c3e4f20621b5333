"""What a search that starts from a trained network sees: the accuracy of its supernet, before any
search step, at uniformly narrowed widths (the leading channels of every slot) and at the random
architecture samples a search draws, with the channels in their own order and ordered by importance
(`tas_keras.importance`: L1 magnitude, Taylor scores).

  python -m bench.supernet_probe --model=runs/pretrained/base/model.keras --name=lite0_imagenette

The supernet's searchable convs normalise with batch statistics, as in the search, so the full width
scores the model in training mode. Writes bench/results/supernet_probe_<name>.json.
"""

import datetime
import os

from absl import app, flags
import numpy as np
import tensorflow as tf

from tas_keras import data, input_convention
from tas_keras.graph import load_model, read_model
from tas_keras.importance import importance_scores, magnitude_scores, order_channels
from tas_keras.runs import write_json
from tas_keras.supernet import GraphSupernet

_MODEL = flags.DEFINE_string("model", None, "A trained .keras model.", required=True)
_DATASET = flags.DEFINE_string("dataset", "../shared/data/imagenette2-224.zip", "As the train CLIs' --dataset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 96, "Side of the test crops.")
_IMAGES = flags.DEFINE_integer("images", 256, "Test images (a random subset of the test split, one batch).")
_RATIOS = flags.DEFINE_list("ratios", ["1.0", "0.9", "0.8", "0.7", "0.6", "0.4"], "Uniform width ratios.")
_TAUS = flags.DEFINE_list("taus", ["5.0", "1.0", "0.1"], "Temperatures of the random samples (3 each).")
_NAME = flags.DEFINE_string("name", None, "Names the results file.", required=True)
ORDERS = ("own", "magnitude", "taylor")


def _uniform(supernet, ratio):
    """Every slot at the candidate nearest ratio x its full width (both picks), every block kept."""
    widths = {}
    for choice in supernet.width_choices:
        index = int(np.argmin([abs(c - ratio * choice.candidates[-1]) for c in choice.candidates]))
        widths[choice.name] = (tf.constant([index, index]), tf.constant([1.0, 0.0]))
    return widths, [tf.one_hot(len(m.depth_choices) - 1, len(m.depth_choices)) for _, m in supernet.stages]


def main(argv):
    del argv
    model = load_model(_MODEL.value)
    dataset = input_convention.feed(data.load_dataset(_DATASET.value, image_size=_IMAGE_SIZE.value), model)
    images, labels = next(iter(dataset.test_batches(_IMAGES.value).unbatch().shuffle(10_000, seed=0)
                               .batch(_IMAGES.value)))
    labels = labels.numpy()
    space = read_model(model)
    scores = {"magnitude": magnitude_scores(model, space), "taylor": importance_scores(model, space, dataset)}

    def accuracy(logits):
        return round(float(np.mean(np.argmax(logits, -1) == labels)), 4)

    result = {
        "command": f"python -m bench.supernet_probe --model={_MODEL.value} --dataset={_DATASET.value} "
                   f"--image_size={_IMAGE_SIZE.value} --name={_NAME.value}",
        "date": datetime.date.today().isoformat(), "images": _IMAGES.value,
        "model_inference_mode": accuracy(model.predict(images, verbose=0)),
        "model_training_mode": accuracy(model(images, training=True)),
    }
    for order in ORDERS:
        ordered = model if order == "own" else order_channels(model, space, scores[order])
        supernet = GraphSupernet(ordered, space)
        supernet.init_from_source(ordered)
        result[f"{order}_order"] = {
            "uniform_width": {ratio: accuracy(supernet(images, _uniform(supernet, float(ratio))))
                              for ratio in _RATIOS.value},
            "random_samples": {tau: [accuracy(supernet(images, supernet.sample(tf.constant(float(tau)),
                                                                               tf.constant([i, 7]))))
                                     for i in range(3)] for tau in _TAUS.value}}
    write_json(os.path.join(os.path.dirname(__file__), "results", f"supernet_probe_{_NAME.value}.json"), result)
    print(result)


if __name__ == "__main__":
    app.run(main)
