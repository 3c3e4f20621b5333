"""Baselines at a matched FLOP target, on the graph space of any model (docs/design.md section 12): a
uniformly shrunk ("pre-defined") shape, the best of N random shapes inside the FLOP band (a keras-tuner
random search), and one-shot global pruning of a trained network by L1 magnitude (the standard
structured pruning of other tools) or by Taylor importance (the least important channels removed). Each
writes its shape as a search does (a GraphShape), so it goes through train.distill exactly like a searched
shape.

The one-shot rankings write the trained network ordered by their scores beside the shape; a random
search that starts its trials from a trained network takes the channels in that network's order: give
it an importance-ordered one (`tas_keras.importance.order_channels`, as train.prune writes it)."""

import dataclasses
import logging
import os

import keras
import keras_tuner
import numpy as np

from tas_keras.configs import TrainingConfig, configured_stage, recorded_when_given
from tas_keras.cost import count_shape
from tas_keras.derive import derive_model
from tas_keras.graph import load_model
from tas_keras import input_convention as conventions
from tas_keras.importance import (group_steps, importance_scores, magnitude_scores, order_channels, slot_groups,
                                  step_scores)
from tas_keras.layer_rules import rule_for
from tas_keras.runs import prepare_run_dir, read_json, run_dir, write_json
from tas_keras.search import cost_band, source_model
from tas_keras.supernet import search_space
from tas_keras.models.registry import image_size_for, is_model_file
from tas_keras.training import CHECKPOINT_STEPS, evaluate_classifier, fit_classifier, save_model

CANDIDATES_FILE = "candidates.json"
ARCH_FILE = "arch.json"
KINDS = ("predefined", "random", "magnitude", "taylor")
RANKED_KINDS = ("magnitude", "taylor")  # one-shot global rankings of L1 magnitude / Taylor scores
ORDERED_FILE = "ordered.keras"
OBJECTIVE = keras_tuner.Objective("valid_accuracy", direction="max")
TUNER_DIR = "tuner"  # keras-tuner's project: the oracle's state and a trial.json per trial
TRIALS_DIR = "trials"  # every trial's training run: backup, epochs.json, TensorBoard
MAX_DRAWS = 100_000  # shapes drawn for one trial before the band is declared out of reach (~5 min)


def _graph_band(space, target_ratio, tolerance, band):
    base = count_shape(space, space.full_shape()).flops
    low, high = cost_band(target_ratio, tolerance, band)
    return base, low * base, high * base


def uniform_shape(space, ratio):
    """Every searchable slot of a GraphSpace at round(C * ratio) channels, in whole multiples of its
    `width_step` (at least one), all blocks kept."""
    return space.shape({slot.name: slot.width_step * max(1, round(slot.full_width * ratio / slot.width_step))
                        for slot in space.searchable_slots}, space.full_shape().depths)


def _widest_within(space, shapes, high):
    """The last shape of the monotone family `shapes(x)`, x in [0, 1], whose FLOPs do not exceed `high`."""
    lo, hi = 0.0, 1.0
    for _ in range(40):  # FLOPs grow with x; bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_shape(space, shapes(mid)).flops <= high else (lo, mid)
    return lo


def predefined_shape(space, target_ratio, tolerance=0.05, band="code"):
    """(the widest uniformly shrunk GraphShape whose FLOPs do not exceed the band's top, its provenance);
    ValueError if the widths' rounding makes the band unreachable."""
    base, low, high = _graph_band(space, target_ratio, tolerance, band)
    ratio = _widest_within(space, lambda r: uniform_shape(space, r), high)
    shape = uniform_shape(space, ratio)
    flops = count_shape(space, shape).flops
    if flops < low:
        raise ValueError(f"no uniform width ratio of {space.name} lands in the FLOP band "
                         f"[{low / base:.3f}, {high / base:.3f}]; widen --tolerance")
    return shape, {"source": "predefined", "width_ratio": ratio, "target_ratio": target_ratio, "flops": flops,
                   "flops_ratio": flops / base}


def ranked_shape(space, scores, target_ratio, tolerance=0.05, band="code", source="magnitude"):
    """(the GraphShape of one-shot global pruning, its provenance): every channel of the searchable
    slots ranked globally by its importance score (`tas_keras.importance`: `magnitude_scores` or
    `importance_scores`, whose per-group normalisation makes the scores of different slots comparable),
    the least important removed until the FLOPs reach the band's top, each slot keeping at least its
    smallest candidate width; all blocks kept. Where removing the next channel would fall below the
    band (a small network's channels move its FLOPs in big steps), that channel is kept and the next
    one in the ranking tried. The channels are taken as `importance.order_channels` orders them by the
    same scores: a slot of width k keeps its k most important. Where a grouped conv keeps whole groups,
    the channels go in those units (`importance.group_steps`), ranked by their mean score."""
    base, low, high = _graph_band(space, target_ratio, tolerance, band)
    groups, steps = slot_groups(space), group_steps(space)
    slots = space.searchable_slots
    step = {slot.name: steps[groups[slot.name]] for slot in slots}
    descending = {slot.name: np.sort(step_scores(scores[groups[slot.name]], step[slot.name]))[::-1] for slot in slots}
    # Every (score, slot) whose unit of channels may go, least important first; a slot's own units go in order.
    ranked = sorted((float(score), index, slot.name) for slot in slots
                    for index, score in enumerate(descending[slot.name])
                    if index * step[slot.name] >= slot.candidates[0])
    full = space.full_shape()

    def removing(count):  # the shape after the `count` least important units go
        widths = dict(full.widths)
        for _, _, name in ranked[:count]:
            widths[name] -= step[name]
        return space.shape(widths, full.depths)

    lo, hi = 0, len(ranked)  # the fewest removals that reach the band's top, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count_shape(space, removing(mid)).flops <= high else (mid + 1, hi)
    shape = removing(max(0, lo - 1))
    for _, _, name in ranked[max(0, lo - 1):]:
        if count_shape(space, shape).flops <= high:
            break
        narrower = space.shape({**shape.widths, name: shape.widths[name] - step[name]}, full.depths)
        if count_shape(space, narrower).flops >= low:
            shape = narrower
    flops = count_shape(space, shape).flops
    if not low <= flops <= high:
        raise ValueError(f"one-shot pruning of {space.name} cannot land in the FLOP band [{low / base:.3f}, "
                         f"{high / base:.3f}] (it reaches {flops / base:.3f}); widen --tolerance")
    return shape, {"source": source, "target_ratio": target_ratio, "flops": flops, "flops_ratio": flops / base}


def depth_name(stage):
    """The hyperparameter of the blocks kept in a Stage."""
    return f"{stage.name}_depth"


def _slot_conditions(space):
    """{slot name: (stage, the fewest blocks the stage keeps for the slot to be built)} for the slots
    whose every conv sits in a droppable block of one stage; the other slots are always built."""
    stage_of = {block.name: (stage, index + 1 + bool(stage.opener))
                for stage in space.stages for index, block in enumerate(stage.blocks)}
    places = {}
    for layer in space.layers:
        if rule_for(layer).searchable_conv and space.slot(layer.out_slot).searchable:
            places.setdefault(layer.out_slot, []).append(stage_of.get(layer.block))
    conditions = {}
    for slot, where in places.items():
        if None not in where and len({stage.name for stage, _ in where}) == 1:
            conditions[slot] = (where[0][0], min(position for _, position in where))
    return conditions


def shape_hyperparameters(space):
    """The search space of a GraphSpace as keras-tuner hyperparameters: a Choice of blocks kept per stage
    (`depth_name`) and a Choice of width per searchable slot (its name, its candidates).

    A slot built only in a block its stage may drop is conditional on the block being kept: keras-tuner
    draws and compares only the active values, so two trials never differ only in convs the network
    does not build. Each stage's depth comes before the first slot it conditions.
    """
    hp = keras_tuner.HyperParameters()
    conditions, declared = _slot_conditions(space), set()
    for slot in space.searchable_slots:
        if slot.name not in conditions:
            hp.Choice(slot.name, list(slot.candidates))
            continue
        stage, fewest = conditions[slot.name]
        if stage.name not in declared:
            hp.Choice(depth_name(stage), list(stage.choices))
            declared.add(stage.name)
        with hp.conditional_scope(depth_name(stage), [d for d in stage.choices if d >= fewest]):
            hp.Choice(slot.name, list(slot.candidates))
    for stage in space.stages:
        if stage.name not in declared:
            hp.Choice(depth_name(stage), list(stage.choices))
    return hp


def shape_from_values(space, values):
    """The GraphShape of a trial's hyperparameter values. A dropped block's slots have no value (they
    are inactive) and keep the full width, which the builder ignores."""
    return space.shape({slot.name: values.get(slot.name, slot.full_width) for slot in space.searchable_slots},
                       {stage.name: values[depth_name(stage)] for stage in space.stages})


class FlopBandOracle(keras_tuner.oracles.RandomSearchOracle):
    """keras-tuner's seeded random search over the shapes of a GraphSpace that proposes only shapes
    whose exact FLOPs lie in `flops_band` (low, high), each shape once.

    keras-tuner draws the values and skips those tried before; this oracle redraws until the shape
    is in the band. Its draw position is part of the oracle's saved state, so a reloaded search
    proposes what an uninterrupted one would have.
    """

    def __init__(self, space, flops_band, max_trials, seed, max_draws=MAX_DRAWS):
        # keras-tuner seeds its i-th draw of a value with seed + i, so the draws of two neighbouring
        # seeds are the same stream shifted by one value; 2**32 apart they never meet. The +1 because
        # the Oracle takes seed 0 for "no seed" and picks a random one.
        super().__init__(objective=OBJECTIVE, max_trials=max_trials, seed=seed * 2**32 + 1,
                         hyperparameters=shape_hyperparameters(space), allow_new_entries=False,
                         tune_new_entries=False,
                         # A trial that raises is a bug or a broken machine, not a bad shape.
                         max_consecutive_failed_trials=1)
        self.space, self.flops_band, self.max_draws = space, flops_band, max_draws

    def populate_space(self, trial_id):
        low, high = self.flops_band
        for _ in range(self.max_draws):
            proposal = super().populate_space(trial_id)
            if proposal["values"] is None:  # keras-tuner found no untried values: the search stops
                return proposal
            if low <= count_shape(self.space, shape_from_values(self.space, proposal["values"])).flops <= high:
                return proposal
        base = count_shape(self.space, self.space.full_shape()).flops
        raise ValueError(f"no random shape of {self.space.name} fell in the FLOP band [{low / base:.3f}, "
                         f"{high / base:.3f}] of the full network in {self.max_draws} draws; uniformly drawn "
                         "shapes rarely keep that fraction: widen --tolerance or move --target_flops_ratio")


class RandomShapeSearch(keras_tuner.Tuner):
    """The random-search baseline on keras-tuner: `FlopBandOracle` proposes, every trial builds its
    shape from `model` (`derive_model`: from scratch, or with `init` the leading channels of `model`'s
    trained weights), trains it with the project's resumable recipe in `<out>/trials/<trial id>` on the
    search-train half of `search(split)` and scores it on the search-valid half.

    keras-tuner keeps its state in `<out>/tuner` and reloads it: finished trials are kept, and the
    trial a killed search was running is run again under the same id, so its training resumes from
    its backup.
    """

    def __init__(self, out, model, space, flops_band, max_trials, epochs, batch_size, seed, learning_rate=0.1,
                 init=False, checkpoint_steps=CHECKPOINT_STEPS, max_draws=MAX_DRAWS):
        super().__init__(FlopBandOracle(space, flops_band, max_trials, seed, max_draws),
                         directory=run_dir(out), project_name=TUNER_DIR)
        self.oracle.verbose = 0  # its per-trial table has a row per conv; run_trial logs one line
        self.out, self.model, self.space, self.seed, self.init = out, model, space, seed, init
        self.epochs, self.batch_size, self.learning_rate = epochs, batch_size, learning_rate
        self.checkpoint_steps = checkpoint_steps

    def run_trial(self, trial, split):
        shape = shape_from_values(self.space, trial.hyperparameters.values)
        # The chief's path on every worker of a cluster: fit_classifier maps it to the worker's own.
        directory = os.path.join(self.out, TRIALS_DIR, trial.trial_id)
        os.makedirs(run_dir(directory), exist_ok=True)
        keras.utils.set_random_seed(self.seed)  # a trial's initial weights depend on the seed alone
        model = derive_model(self.model, self.space, shape, transfer_weights=self.init)
        fit_classifier(model, split, directory, self.epochs, self.batch_size, self.learning_rate, self.seed,
                       self.checkpoint_steps)
        accuracy = evaluate_classifier(model, split, self.batch_size)["test_accuracy"]
        logging.info("trial %s: %.2f MFLOPs, valid accuracy %.4f", trial.trial_id,
                     count_shape(self.space, shape).flops / 1e6, accuracy)
        return {OBJECTIVE.name: accuracy}


def random_search(out, model, space, dataset, target_ratio, count, epochs, batch_size, seed=0, tolerance=0.05,
                  band="code", learning_rate=0.1, init=False, checkpoint_steps=CHECKPOINT_STEPS):
    """Runs `RandomShapeSearch` for `count` trials (or resumes it); writes `out/candidates.json`, every
    trial's shape and valid accuracy, and returns (the best shape, its provenance)."""
    base, low, high = _graph_band(space, target_ratio, tolerance, band)
    split, _ = dataset.search_halves(seed=seed)  # trains on the search-train half, tests on the other
    tuner = RandomShapeSearch(out, model, space, (low, high), count, epochs, batch_size, seed, learning_rate,
                              init, checkpoint_steps=checkpoint_steps)
    tuner.search(split)
    results = []
    for trial in sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id):  # zero-padded ids
        if trial.status != keras_tuner.engine.trial.TrialStatus.COMPLETED:
            continue  # keras-tuner lost it: killed between writing its trial file and the oracle's state
        shape = shape_from_values(space, trial.hyperparameters.values)
        flops = count_shape(space, shape).flops
        results.append({"valid_accuracy": float(trial.score), "shape": shape.point(),
                        "provenance": {"source": "random", "seed": seed, "trial": trial.trial_id,
                                       "target_ratio": target_ratio, "flops": flops, "flops_ratio": flops / base}})
    write_json(os.path.join(run_dir(out), CANDIDATES_FILE), results)
    # The first best in trial order. keras-tuner's own ranking keeps ties in the order it holds the
    # trials, which after a reload is the order of a glob over their files: not a resume's invariant.
    best = max(results, key=lambda r: r["valid_accuracy"])
    return space.shape(**best["shape"]), {**best["provenance"], "valid_accuracy": best["valid_accuracy"],
                                          "candidates": len(results), "epochs_per_candidate": epochs}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaselineConfig(TrainingConfig):
    """The settings of a baseline shape (`make_baseline`).

    `kind`: one of `KINDS`. `model_name`: a registry name or a .keras file; the shape is one of its space
    `supernet.search_space(model_name, ..., add_mode, width_multiple)`, as a search reads it, keeping
    `target_ratio` of the full FLOPs within the band of `tolerance` and `band` (`search.cost_band`).
    `count`: the random search's trials, each trained `epochs` at `learning_rate`. `trained`: a trained
    full network (.keras; default: `model_name` when it is a .keras file: `trained_model`) whose weights
    the rankings score (they need one) and whose leading channels the random search's trials start from
    (else from scratch). The data, run and schedule settings are `TrainingConfig`'s.
    """

    stage = "baseline"

    kind: str = "predefined"
    model_name: str = "resnet20"
    target_ratio: float = 0.5
    tolerance: float = 0.05
    band: str = "code"
    count: int = 8
    epochs: int = 1  # of every random trial
    # Settings the baselines took after runs were made (input_convention too): recorded only away from their
    # defaults, so that those runs resume. The shared ones are redefined here to be so.
    add_mode: str = recorded_when_given(None)
    width_multiple: int = recorded_when_given(1)
    trained: str = recorded_when_given(None)
    learning_rate: float = recorded_when_given(0.1)
    mixed_precision: str = recorded_when_given(None)

    def validate(self):
        super().validate()
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not 0 < self.target_ratio < 1:
            raise ValueError(f"target ratio must be in (0, 1), got {self.target_ratio!r}")
        if self.count < 1:  # keras-tuner reads max_trials=0 as "no limit"
            raise ValueError(f"count must be >= 1, got {self.count!r}")
        cost_band(self.target_ratio, self.tolerance, self.band)
        if self.kind in RANKED_KINDS and not self.trained_model():
            raise ValueError(f"{self.kind} pruning scores a trained network: give a .keras model or a trained "
                             f"{self.model_name} (--trained)")

    def trained_model(self):
        """The trained full network (.keras) of the baseline: `trained`, else `model_name` when it is a
        .keras file, else None."""
        return self.trained or (self.model_name if is_model_file(self.model_name) else None)


@configured_stage(BaselineConfig)
def make_baseline(out, config, overwrite):
    """Writes `out/arch.json`: the pre-defined shape of `config.model_name` (`BaselineConfig`), the best of
    a `count`-trial random search (`random_search`; a killed search resumes), or the shape of one-shot
    global pruning by the L1 magnitude ("magnitude") or the Taylor scores ("taylor", measured on the data)
    of the trained network (`ranked_shape`), which also writes that network with its channels ordered by
    the same scores to `out/ordered.keras`: train the shape from it (Init + KD) so that each slot keeps
    its most important channels. Returns the shape file's dict."""
    trained = config.trained_model()
    # The files a config names are checked when it runs: a config read back from a run.json stays valid.
    for path in filter(None, (trained, config.model_name if is_model_file(config.model_name) else None)):
        if not os.path.isfile(path):
            raise ValueError(f"model file {path!r} does not exist")
    dataset = config.load_dataset(image_size_for(config.model_name, config.image_size))
    model = source_model(config.model_name, dataset)
    dataset = conventions.feed(dataset, model, config.input_convention)
    space = search_space(config.model_name, model, config.add_mode, config.width_multiple)
    run, finished = prepare_run_dir(out, config.run_record(), overwrite, done_file=ARCH_FILE)
    if finished:
        return read_json(os.path.join(out, ARCH_FILE))
    if trained:
        model = load_model(trained)
    kind = config.kind  # a baseline's kind (the registry's layer kinds are compared as `.kind` only there)
    if kind == "predefined":
        shape, provenance = predefined_shape(space, config.target_ratio, config.tolerance, config.band)
    elif kind in RANKED_KINDS:
        scores = (magnitude_scores(model, space) if kind == "magnitude" else
                  importance_scores(model, space, dataset, config.batch_size, seed=config.seed))
        save_model(order_channels(model, space, scores), os.path.join(run, ORDERED_FILE))
        shape, provenance = ranked_shape(space, scores, config.target_ratio, config.tolerance, config.band,
                                         source=kind)
    else:
        shape, provenance = random_search(out, model, space, dataset, config.target_ratio, config.count,
                                          config.epochs, config.batch_size, seed=config.seed,
                                          tolerance=config.tolerance, band=config.band,
                                          learning_rate=config.learning_rate, init=bool(trained),
                                          checkpoint_steps=config.checkpoint_steps)
    shape = dataclasses.replace(shape, provenance=provenance)
    shape.save(os.path.join(run, ARCH_FILE))
    return shape.to_dict()
