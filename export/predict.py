"""Classifies image files with an exported .tflite (LiteRT), naming the classes from labels.txt.

  python -m export.predict runs/quickstart/export/int8/model.tflite photo.jpg [more.jpg ...]

Prints, for every image, its `--top` classes with their probabilities (the softmax of the model's
logits). Images of another size are resized to the model's input, as the training data was.
"""

from train import common_flags  # first: it quiets TensorFlow's logging before TensorFlow loads

from absl import flags  # noqa: E402

from tas_keras.export.verify import classify_files  # noqa: E402

_TOP = flags.DEFINE_integer("top", 5, "How many classes to print per image.", lower_bound=1)
_THREADS = flags.DEFINE_integer("threads", 1, "LiteRT CPU threads.", lower_bound=1)


def main(arguments):
    model_path, *image_paths = arguments
    if not image_paths:
        raise ValueError(f"no image given: python -m export.predict {model_path} IMAGE [IMAGE ...]")
    for path, classes in zip(image_paths, classify_files(model_path, image_paths, _TOP.value, _THREADS.value)):
        print(path)
        width = max(len(name) for name, _ in classes)
        for rank, (name, probability) in enumerate(classes, start=1):
            print(f"  {rank}. {name:<{width}}  {100 * probability:6.2f}%")


if __name__ == "__main__":
    common_flags.run(main, positional="MODEL.tflite IMAGE [IMAGE ...]")
