"""A user's own model, written and trained as Keras' tutorials do, through the main job on real images.

  python -m bench.user_model --runs=runs/user_model

The model: an augmentation Sequential in front (RandomFlip, RandomRotation, RandomZoom), a Rescaling to
[0, 1], a small residual CNN backbone nested as its own functional model (as a task model calls a
keras-hub backbone), global pooling, dropout and a Dense softmax head. It is trained the user's way
(`keras.utils.image_dataset_from_directory` on the unzipped Imagenette folders, `model.fit`,
`model.save`), then handed to the main job as a .keras file with the dataset zip
(`tas_keras.api.prune`, the `train.prune --model=user.keras` of the README) at 50% of its FLOPs.

Written to bench/results/user_model_imagenette.json: the user's training (epochs, its own validation
accuracy), the main job's report (base and pruned accuracy in Keras and as .tflite, FLOPs, what the
exports output) and the wall times. The pruned network must stay well above chance and the export must
end in the softmax the user's model ended in. Each part resumes: the trained model is kept in --runs,
and the main job resumes its run directory.
"""

import datetime
import os
import platform
import time
import zipfile

from absl import app, flags
import keras

from bench.provenance import commit
from tas_keras import api
from tas_keras.runs import read_json, write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results", "user_model_imagenette.json")
L = keras.layers

_RUNS = flags.DEFINE_string("runs", None, "Directory of the experiment's files.", required=True)
_DATASET = flags.DEFINE_string("dataset", "../shared/data/imagenette2-224.zip", "The Imagenette zip.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Input side of the user's model.")
_USER_EPOCHS = flags.DEFINE_integer("user_epochs", 8, "Epochs of the user's own training.")
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", 4, "The main job's search epochs.")
_DISTILL_EPOCHS = flags.DEFINE_integer("distill_epochs", 4, "The main job's KD epochs.")
_TARGET = flags.DEFINE_float("target_flops_ratio", 0.5, "The main job's FLOPs target.")


def backbone(image_size):
    """A small residual CNN as its own functional model: three stages of conv-BN-ReLU and a residual block."""
    inputs = keras.Input((image_size, image_size, 3), name="backbone_input")
    x = inputs
    for stage, width in enumerate((32, 64, 128), start=1):
        x = L.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"stage{stage}_down")(x)
        x = L.ReLU(name=f"stage{stage}_down_relu")(L.BatchNormalization(name=f"stage{stage}_down_bn")(x))
        y = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"stage{stage}_conv_a")(x)
        y = L.ReLU(name=f"stage{stage}_relu_a")(L.BatchNormalization(name=f"stage{stage}_bn_a")(y))
        y = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"stage{stage}_conv_b")(y)
        y = L.BatchNormalization(name=f"stage{stage}_bn_b")(y)
        x = L.ReLU(name=f"stage{stage}_out")(L.Add(name=f"stage{stage}_add")([x, y]))
    return keras.Model(inputs, x, name="backbone")


def user_model(image_size, num_classes):
    augmentation = keras.Sequential([L.RandomFlip("horizontal"), L.RandomRotation(0.05), L.RandomZoom(0.1)],
                                    name="augmentation")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = L.Rescaling(1 / 255, name="rescale")(augmentation(inputs))
    x = L.GlobalAveragePooling2D(name="pool")(backbone(image_size)(x))
    outputs = L.Dense(num_classes, activation="softmax", name="predictions")(L.Dropout(0.2, name="dropout")(x))
    return keras.Model(inputs, outputs, name="user_cnn")


def unzipped(zip_path, directory):
    """The dataset's folders, unzipped as a user would (once)."""
    done = os.path.join(directory, ".unzipped")
    if not os.path.exists(done):
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(directory)
        open(done, "w").close()
    (root,) = [entry.path for entry in os.scandir(directory) if entry.is_dir()]
    return root


def train_as_a_user(runs):
    """(path of the trained .keras model, its training record), trained once."""
    path = os.path.join(runs, "user.keras")
    record_path = os.path.join(runs, "user_training.json")
    if os.path.exists(path) and os.path.exists(record_path):
        return path, read_json(record_path)
    root = unzipped(_DATASET.value, os.path.join(runs, "data"))
    size = (_IMAGE_SIZE.value, _IMAGE_SIZE.value)
    train = keras.utils.image_dataset_from_directory(os.path.join(root, "train"), image_size=size, batch_size=64,
                                                     seed=0)
    val = keras.utils.image_dataset_from_directory(os.path.join(root, "val"), image_size=size, batch_size=64,
                                                   shuffle=False)
    keras.utils.set_random_seed(0)
    model = user_model(_IMAGE_SIZE.value, len(train.class_names))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=_USER_EPOCHS.value, verbose=2)
    record = {"epochs": _USER_EPOCHS.value, "image_size": _IMAGE_SIZE.value,
              "val_accuracy": [round(float(a), 4) for a in history.history["val_accuracy"]],
              "wall_time_s": round(time.perf_counter() - start, 1),
              "params": model.count_params()}
    model.save(path)
    write_json(record_path, record)
    return path, record


def main(argv):
    del argv
    runs = _RUNS.value
    os.makedirs(runs, exist_ok=True)
    model_path, training = train_as_a_user(runs)
    start = time.perf_counter()
    report = api.prune(model_path, _DATASET.value, _TARGET.value, os.path.join(runs, "prune"),
                       search_epochs=_SEARCH_EPOCHS.value, distill_epochs=_DISTILL_EPOCHS.value)
    write_json(RESULTS, {
        "command": "python -m bench.user_model --runs=" + runs, "date": datetime.date.today().isoformat(),
        "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": {"dataset": os.path.basename(_DATASET.value), "image_size": _IMAGE_SIZE.value,
                     "target_flops_ratio": _TARGET.value, "search_epochs": _SEARCH_EPOCHS.value,
                     "distill_epochs": _DISTILL_EPOCHS.value},
        "user_training": training, "prune_wall_time_s": round(time.perf_counter() - start, 1),
        "report": {key: report[key] for key in ("base", "pruned", "keras_accuracy", "exports", "checks_passed",
                                                "base_at_chance")}})


if __name__ == "__main__":
    app.run(main)
