"""Stage configs: every setting of a stage as one frozen, validated object.

A stage's config (`search.SearchConfig`, ...) is a frozen dataclass deriving from `StageConfig`: its
fields are the stage's settings with their defaults, checked once when the config is made (`validate`,
one-line ValueErrors quoting the bad value). The stage functions, the Python API (`tas_keras.api`) and
the CLIs all make one and override its fields (`replace`); the run directory's run.json is its
`run_record`. A stage function `stage(out, config, overwrite)` made a `configured_stage` is called
`stage(out, config=None, overwrite=False, **overrides)`.

Three kinds of field are not plain settings of the result:
- `run_only`: how a stage runs (its devices, backups, data streaming), not what it computes, so a
  resumed run may change it and run.json leaves it out;
- `recorded_when_given`: a setting added after runs were made, recorded only away from its default, so
  the run.json of those earlier runs (made without it) still matches a resumed run of the same settings;
- `recorded_as`: a setting run.json records under the name it had before it was a config field, so the
  run.json of earlier runs still matches.
"""

import dataclasses
import functools

from tas_keras import input_convention as conventions
from tas_keras.data import BUNDLED_DATASET, load_dataset, recorded_name
from tas_keras.distribute import strategy_scope
from tas_keras.precision import check_mixed_precision, dtype_policy_scope
from tas_keras.runs import locking_stage

_RUN_ONLY, _OMITTED_AT_DEFAULT, _RECORD_KEY = "run_only", "omitted_at_default", "record_key"


def run_only(default):
    return dataclasses.field(default=default, metadata={_RUN_ONLY: True})


def recorded_when_given(default):
    return dataclasses.field(default=default, metadata={_OMITTED_AT_DEFAULT: True})


def recorded_as(key, default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={_RECORD_KEY: key})


def _record_key(field):
    return field.metadata.get(_RECORD_KEY, field.name)


class StageConfig:
    """The shared behaviour of the stage configs, which are frozen dataclasses deriving from it.

    `stage`: the stage's name, recorded in run.json."""

    stage = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raises a ValueError quoting the first bad value; a subclass checks its fields."""

    @classmethod
    def setting_names(cls):
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def _check_names(cls, names):
        unknown = sorted(set(names) - set(cls.setting_names()))
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting {unknown[0]!r}; its settings: "
                             f"{', '.join(cls.setting_names())}")

    def replace(self, **overrides):
        """A copy with `overrides` (validated) in place of these settings."""
        self._check_names(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self):
        """Every setting, by name (`from_dict` makes the same config from it)."""
        return {name: getattr(self, name) for name in self.setting_names()}

    @classmethod
    def from_dict(cls, settings):
        """The config of `settings` (a `to_dict` or a run.json `run_record`)."""
        setting_of_key = {_record_key(field): field.name for field in dataclasses.fields(cls)}
        settings = {setting_of_key.get(key, key): value for key, value in settings.items()}
        stage = settings.pop("stage", cls.stage)
        if stage != cls.stage:
            raise ValueError(f"{cls.__name__} is the config of the {cls.stage} stage, got settings of {stage!r}")
        cls._check_names(settings)
        return cls(**settings)

    def run_record(self):
        """What run.json records of the run: the stage and every setting but the `run_only` ones, the
        `recorded_when_given` ones only away from their defaults, the `recorded_as` ones under their keys."""
        record = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get(_RUN_ONLY) or (field.metadata.get(_OMITTED_AT_DEFAULT) and value == field.default):
                continue
            record[_record_key(field)] = value
        return {**record, "stage": self.stage}


# How often a training stage backs its state up, in steps (and every epoch).
CHECKPOINT_STEPS = 200


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings(StageConfig):
    """The settings of every stage that reads the dataset: `dataset_name` a dataset name or path as
    `data.load_dataset` takes it, or a loaded dataset; `seed` (data order, augmentation, init, splits);
    `input_convention`: how the images are fed (`tas_keras.input_convention`)."""

    dataset_name: object = BUNDLED_DATASET
    data_dir: str = None
    seed: int = 0
    input_convention: str = recorded_when_given(None)

    def validate(self):
        conventions.check(self.input_convention)

    def run_record(self):
        dataset_key = next(_record_key(f) for f in dataclasses.fields(self) if f.name == "dataset_name")
        return {**super().run_record(), dataset_key: recorded_name(self.dataset_name)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings(DataSettings):
    """The settings of every stage that trains, besides its schedule: `image_size` and
    `max_train_examples` as `data.load_dataset` takes them; `mixed_precision` None (float32),
    "mixed_bfloat16" or "mixed_float16" (`tas_keras.precision`). `strategy` (`tas_keras.distribute`) and
    `streaming` (`data.load_dataset`) say how a stage runs, not what it computes: a resumed run may
    change them."""

    image_size: int = None
    max_train_examples: int = None
    mixed_precision: str = None
    streaming: str = run_only("auto")
    strategy: str = run_only("auto")

    def validate(self):
        super().validate()
        check_mixed_precision(self.mixed_precision)

    def load_dataset(self, image_size):
        """The dataset of these settings (`data.load_dataset`) at `image_size`: the config's, or the side
        the stage resolved from its model when the config leaves it to the model."""
        return load_dataset(self.dataset_name, data_dir=self.data_dir, max_train_examples=self.max_train_examples,
                            seed=self.seed, image_size=image_size, streaming=self.streaming)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingConfig(RunSettings):
    """A training stage's config: the run settings and its schedule. `checkpoint_steps` (the backups) says
    how it runs, not what it trains: a resumed run may change it."""

    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 0.1
    checkpoint_steps: int = run_only(CHECKPOINT_STEPS)

    def validate(self):
        super().validate()
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"epochs, batch_size and learning_rate must be positive, got {self.epochs}, "
                             f"{self.batch_size}, {self.learning_rate}")


def configure(config_class, config, overrides):
    """`config` with `overrides`; without `config`, the `config_class` of `overrides` and its defaults."""
    return config_class.from_dict(overrides) if config is None else config.replace(**overrides)


def configured_stage(config_class):
    """Makes a stage function `stage(out, config, overwrite)` callable as `stage(out, config=None,
    overwrite=False, **overrides)`: its config made by `configure`, run in the scope of its `strategy`
    and under the dtype policy of its `mixed_precision`, the run directories the stage locked released
    when it returns (`runs.locking_stage`)."""

    def wrap(stage):
        locked = locking_stage(stage)

        @functools.wraps(stage)
        def run(out, config=None, overwrite=False, **overrides):
            config = configure(config_class, config, overrides)
            with strategy_scope(config.strategy), dtype_policy_scope(config.mixed_precision):
                return locked(out, config, overwrite)

        return run

    return wrap
