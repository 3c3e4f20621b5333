"""The TAS search space of any supported Keras CNN, read from its functional graph (docs/design.md section 11).

`read_model(model)` walks the nodes of a functional model (or a built Sequential) from its output back
to its input and returns a `GraphSpace` (`tas_keras.graph_space`): every layer with the width slot it reads and the one it
writes, the width slots with their candidate widths, the stages of droppable residual blocks with their
depth choices, and (in "independent" mode) the identity shortcuts a derived network may project.
`GraphShape` is one point of that space; `GraphSpace.plan(shape)` resolves it into the layers the
derived network really has (with their channel counts), which both the builder (`tas_keras.derive`)
and the FLOP counter (`tas_keras.cost.count_shape`) read, so the counted network is the built one.

Width rules (each layer class's is its rule in `tas_keras.layer_rules`). Every tensor carries a width slot.
  - The input layer opens a fixed slot (the image channels).
  - A Conv2D with groups=1 opens a searchable slot named after it, whose candidates are
    `candidate_widths(filters, multiple_of)` (the paper's ratios 0.3 .. 1.0).
  - A grouped Conv2D (groups > 1) is pruned in whole groups. When each group has as many outputs as
    inputs (RegNet's and ResNeXt's), it follows its input's slot like a depthwise conv (keeping k groups
    keeps k groups of inputs and of outputs), and every width of that slot is a whole number of groups:
    its `width_step` is the group width (the least common multiple where grouped convs of several group
    widths read it) and its candidates are `candidate_widths(filters, lcm(multiple_of, width_step))`.
    One whose groups change the channel count fixes its input slot and opens a fixed one.
  - A SeparableConv2D is a depthwise conv that follows its input's slot and a pointwise conv that opens a
    searchable slot named after it (the supernet runs it as a depthwise conv and a searchable 1x1 conv).
  - A Conv2DTranspose (a U-Net's up-convolution) opens a searchable slot named after it, as a Conv2D does.
  - A Dense on a feature map (4-D) is a 1x1 conv: it opens a searchable slot as a Conv2D does (ConvNeXt's
    pointwise convs). A Dense on a vector opens a fixed slot (it is not searched); other ranks are refused.
  - DepthwiseConv2D (depth_multiplier 1), a Conv2D whose groups are its input and output channels (a
    depthwise conv, as ConvNeXt writes it), BatchNormalization and LayerNormalization (over the channel
    axis only), ConvNeXt's LayerScale and StochasticDepth, activations (ReLU, Activation, LeakyReLU,
    ELU, Softmax), pooling, padding, cropping, up-sampling, dropout and noise layers, Identity,
    Rescaling and Normalization pass their input's slot through: a depthwise conv and its BN follow
    the width of the slot that feeds them.
  - A layer that holds per-channel constants it cannot slice (Normalization, a Rescaling with a vector
    scale or offset) or mixes the channels (softmax over the channel axis, also as a conv activation)
    fixes its slot. Flatten of a spatial map, Reshape and a DepthwiseConv2D with depth_multiplier > 1
    fix their input slots and open a fixed slot for their output; a Reshape that only adds or drops axes
    of size 1 before the channels (a squeeze-excitation gate's (batch, C) -> (batch, 1, 1, C)) keeps its
    input's slot.
  - A Concatenate (channel axis) opens a slot whose members are its inputs' slots (a Concatenate's
    members in turn), each keeping its own width: a derived network keeps each member's leading
    channels at that member's offset, and the layers reading it read those (DenseNet, Inception). Fixing
    it fixes its members; merging it with another tensor (an Add) fixes both, as their widths could
    not be kept equal.
  - Element-wise keras.ops operations on symbolic tensors (`x + 3.0`, `keras.ops.relu6(x)`, `x * gate`)
    follow their tensor input's slot, or tie the slots of two tensor inputs; the constants they are
    called with are recorded (`GraphLayer.operands`) and the derived network calls the same operation.
  - The slot of the model's output is fixed (the classifier, Dense or Conv2D).
  - Add (and Multiply, Subtract, Average, Maximum, Minimum, which are always tied): the inputs must have
    equal channel counts.
      "tied" (default for models this project does not build, as DepGraph-style tools do): every input
      of the merge joins one slot (union-find), named after the slot of its first input; no layer is
      ever added to the user's model.
      "independent" (the reference code's rule for the CIFAR ResNets, docs/design.md section 4): for an
      Add of two inputs of equal shape,
        * identity shortcut: one input x is an ancestor of the other, r. The widths stay independent
          and the output carries r's slot. Where a shape gives x and r different widths, the derived
          network feeds x through `<block>_shortcut_conv` (a 1x1 conv with the settings of the conv
          that opens r's slot) and `<block>_shortcut_bn` (with the settings of the BN between that
          conv and r, when there is one); `<block>` is the Add's name without its "_add" suffix. When
          r does not come from an ungrouped Conv2D through BN and pass-through layers only (say,
          through a squeeze-excitation Multiply), there are no settings to copy and the Add is tied.
        * projection shortcut: one input p comes from an ungrouped Conv2D P through single-consumer BN /
          pass-through layers only, and the tensor P reads (followed back through single-consumer
          pass-through layers to where the graph branches) is an ancestor of the other input r.
          P does not open a slot of its own: it takes r's slot (the shortcut reuses the block-output
          conv's choice).
        * anything else is tied.
  - A fixed slot tied to a searchable one makes the whole group fixed.

Depth rules.
  - An identity block is an Add(x, r) (an Add layer, or `x + r` written with keras.ops, as ConvNeXt
    writes it) of two inputs of equal shape where x is an ancestor of r and the layers between them (the
    residual branch) read only x or each other and feed only each other or the Add. The block is the
    branch, the Add, and the elementwise activations that follow the Add while each is its tensor's only
    consumer; its exit is the last of those. Dropping it hands x to whatever read the exit. A block whose
    branch holds another block is not droppable, nor one whose shortcut is not x itself (ResNetV2's
    max-pooled shortcut of a stride-2 block): such a block ends the chain before it. A block is named
    after its Add without an "_add" suffix; one a keras.ops addition closes (numbered by Keras) after
    the common prefix of its layers with weights.
  - Identity blocks whose entry is the previous one's exit form a chain; a maximal chain is a stage.
    The stage's first block is always kept:
        * the projection block (an Add that is not an identity block) whose exit is the chain's entry;
        * else the layers just before the chain (the latest ones its entry depends on, back to the
          previous Add) when they repeat the chain's residual branch: the same layer classes, as many
          of each, padding and dropout aside. So MobileNetV2's, MobileNetV3's and the EfficientNets'
          stage-opening inverted residual blocks (stride 2 or a new width, no Add; with a
          squeeze-excitation gate; without the dropout of the residual blocks) are found;
        * else (the chain starts after a stem, as a CIFAR ResNet's first stage) the chain's own first
          identity block.
    The stage's depth choices are `depth_choices(n)` over its n blocks, first block included.

Loading (`load_model`, which every stage uses) reads nested functional models through and leaves random
augmentation layers out (`plain_graph`), and takes a final softmax off (`logits_model`).

Refused (UnsupportedModelError, one line naming the layer and its class): subclassed models, models
with several inputs or outputs, unknown spatial sizes, channels_first layers, nested subclassed models,
shared layers, keras.ops operations other than the element-wise ones (and a division by a tensor, an
operand that is an array), layers called with arguments other than plain values (plain ones, such as
the training=False Keras records for a Dropout, are carried into the derived model), Dense on an input
that is neither a vector nor a feature map, LayerNormalization over other axes than the channels (or
with rms_scaling), GroupNormalization (a narrower network's groups would hold other channels),
Concatenate along another axis than the channels, and every layer class not listed above (Lambda,
recurrent layers, Conv1D/3D and their transposed convs, PReLU, ...).
"""

import dataclasses
import inspect
import math
import os

import keras

from tas_keras.graph_space import (ADD_MODES, INDEPENDENT, TIED, GraphLayer, GraphSpace, IdentityShortcut,
                                   ResidualBlock, Stage, WidthSlot, output_size)
from tas_keras.layer_rules import (UnsupportedModelError, is_input_layer, is_random_augmentation, matching_rule,
                                   refuse, rule_for_layer)
from tas_keras.search_space import WIDTH_RATIOS, candidate_widths, depth_choices


def load_model(model_or_path, logits=True):
    """A keras.Model, or the model in a .keras file (without compiling it), as one flat graph without
    random augmentation layers (`plain_graph`); with `logits`, without the final softmax it may end in
    (`logits_model`): the project trains and distils on logits."""
    if isinstance(model_or_path, keras.Model):
        model = model_or_path
    else:
        path = os.fspath(model_or_path)
        if not path.endswith(".keras"):
            raise ValueError(f"expected a keras.Model or a .keras file, got {model_or_path!r}")
        if not os.path.exists(path):
            raise ValueError(f"model file {path!r} does not exist")
        model = keras.models.load_model(path, compile=False)
    model = plain_graph(model)
    return logits_model(model) if logits else model


def _nested(model):
    """The functional models (and Sequentials built on an input) a model calls as layers."""
    return [op for op in getattr(model, "operations", ())
            if isinstance(op, keras.Model) and (getattr(op, "_functional", None) or hasattr(op, "_nodes_by_depth"))]


def plain_graph(model):
    """`model` as one flat graph of the layers that compute its function at inference:
      - every nested functional model (or Sequential built on an input) is replaced by the layers it
        holds, called as it calls them: an augmentation `keras.Sequential` in front, a backbone called as
        `base(x, training=False)` (Keras' transfer-learning recipe; the `training` it is called with
        reaches its layers, as Keras passes it on);
      - random augmentation layers (RandomFlip, RandomRotation, ...: the identity at inference) are left
        out: the project augments the training images itself (random crops and flips), and the pruned
        network and its export are for inference.
    The layers are the same objects, with the same names and weights; `model` itself when it has
    nothing to change. A name used both inside and outside a nested model is refused
    (UnsupportedModelError)."""
    if isinstance(model, keras.Sequential) and getattr(model, "_functional", None) is not None:
        model = model._functional
    if not _nested(model) and not any(is_random_augmentation(op) for op in _all_operations(model)):
        return model

    def inlined(functional, inputs, training):
        functional = getattr(functional, "_functional", None) or functional

        def operation_fn(op):
            if is_random_augmentation(op):
                return lambda *args, **kwargs: args[0]
            if op in _nested(functional):
                return lambda *args, **kwargs: inlined(op, args[0], kwargs.get("training", training))
            if training is None or "training" not in inspect.signature(op.call).parameters:
                return op
            return lambda *args, **kwargs: op(*args, **{"training": training, **kwargs})

        return functional._run_through_graph(inputs, operation_fn=operation_fn)

    image = model.inputs[0]
    inputs = keras.Input(batch_shape=image.shape, dtype=image.dtype, name=image._keras_history[0].name)
    names = {}
    for op in _all_operations(model):
        if not (is_input_layer(op) or is_random_augmentation(op)) and (
                names.setdefault(op.name, op) is not op):
            refuse(op, f"a nested model uses the name {op.name!r} for another layer too; the layers of a model "
                       "read through must have distinct names")
    return keras.Model(inputs, inlined(model, [inputs], None), name=model.name)


def _all_operations(model):
    for op in getattr(model, "operations", ()):
        if op in _nested(model):
            yield from _all_operations(getattr(op, "_functional", None) or op)
        else:
            yield op


def operation(model, name):
    """The layer or keras.ops operation of `model` named `name` (`model.get_layer` finds layers only)."""
    for candidate in getattr(model, "operations", ()):  # a Sequential holds layers only
        if candidate.name == name:
            return candidate
    return model.get_layer(name)


def softmax_head(model):
    """The name of the layer that applies the model's final softmax over the classes (a Softmax or a
    softmax Activation layer, or the softmax activation of the Dense or conv it ends in), else None."""
    try:
        outputs = model.outputs
    except AttributeError:  # a Sequential without an input yet
        return None
    if not outputs or len(outputs) != 1:  # a subclassed model has none
        return None
    last = outputs[0]._keras_history[0]
    rule = matching_rule(last)
    return last.name if rule is not None and rule.ends_in_softmax(last, len(outputs[0].shape)) else None


def logits_model(model):
    """`model` without its final softmax (`softmax_head`), with the same layers, names and weights: a
    Softmax or Activation layer is left off, a Dense or conv is rebuilt with a linear activation;
    `model` itself when it ends in no softmax. The export puts the softmax back
    (`tas_keras.export.exporter.export_and_verify`'s `output`)."""
    head = softmax_head(model)
    if head is None:
        return model
    last = model.get_layer(head)
    node = last._inbound_nodes[-1]
    (features,) = node.input_tensors
    return keras.Model(model.inputs, rule_for_layer(last).logits(last, features), name=model.name)


def read_model(model, add_mode=TIED, multiple_of=1, ratios=WIDTH_RATIOS):
    """Reads a functional Keras model (or a .keras path) into its GraphSpace; see the module docstring."""
    if add_mode not in ADD_MODES:
        raise ValueError(f"add_mode must be one of {ADD_MODES}, got {add_mode!r}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of!r}")
    return _GraphReader(load_model(model), add_mode, multiple_of, tuple(ratios)).read()


def _functional_graph(model):
    """The model's nodes in graph order, refusing what the reader cannot see into."""
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise UnsupportedModelError(f"{model.name} (Sequential): build it with a keras.Input first")
        model = model._functional
    elif not hasattr(model, "_nodes_by_depth"):
        raise UnsupportedModelError(
            f"{model.name} ({type(model).__name__}): a subclassed model has no graph to read; "
            "build it functionally (keras.Input -> layers -> keras.Model)")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(f"{model.name} ({type(model).__name__}): the reader takes one image "
                                    f"input and one output, got {len(model.inputs)} and {len(model.outputs)}")
    nodes, pending = {}, [model.outputs[0]]
    while pending:
        tensor = pending.pop()
        operation, node_index, _ = tensor._keras_history
        node = operation._inbound_nodes[node_index]
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        pending.extend(node.input_tensors)
    order = {id(op): index for index, op in enumerate(model.operations)}
    nodes = sorted(nodes.values(), key=lambda node: order[id(node.operation)])
    seen = set()
    for node in nodes:
        layer = node.operation
        if isinstance(layer, keras.Model):
            refuse(layer, "a nested model that is not functional (subclassed, or a Sequential without an "
                          "input), which the reader cannot see into")
        rule_for_layer(layer)  # refuses an operation without a rule now, before the details below
        if layer.name in seen:
            refuse(layer, "a shared layer (called more than once)")
        seen.add(layer.name)
        if len(node.outputs) != 1:
            refuse(layer, f"the reader takes layers with one output, this one has {len(node.outputs)}")
        odd = {key: value for key, value in node.arguments.kwargs.items()
               if not isinstance(value, (type(None), bool, int, float, str))}
        if odd:
            refuse(layer, f"called with arguments {sorted(odd)} that the reader cannot carry")
        shape = node.outputs[0].shape
        if any(d is None for d in shape[1:]):
            refuse(layer, f"output shape {tuple(shape)} has unknown sizes; build the model with a fixed "
                           "input_shape")
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            refuse(layer, f"data_format {layer.data_format!r}: the reader takes channels_last models")
    return nodes


class _Slots:
    """Union-find over width slots; a group's name is its root's. A Concatenate's output is a slot of
    member slots (`WidthSlot.members`): fixing it fixes its members, and tying it to another slot, which
    would need equal widths that no member can promise, fixes both."""

    def __init__(self):
        self.parent, self.full_width, self.fixed_reason, self.width_step, self.members = {}, {}, {}, {}, {}

    def open(self, name, full_width, fixed_reason=""):
        self.parent[name], self.full_width[name], self.fixed_reason[name] = name, full_width, fixed_reason
        self.width_step[name] = 1
        return name

    def concatenate(self, name, in_slots):
        members = []
        for slot in in_slots:
            members.extend(self.members.get(self.find(slot), (slot,)))
        self.open(name, sum(self.full_width[self.find(slot)] for slot in in_slots))
        self.members[name] = tuple(members)
        return name

    def find(self, name):
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def tie(self, keep, other):
        keep, other = self.find(keep), self.find(other)
        if keep == other:
            return
        for joined in (keep, other):
            if joined in self.members:
                reason = f"{joined} (Concatenate) is merged with another tensor"
                self.fix(keep, reason)
                self.fix(other, reason)
        if keep in self.members and other not in self.members:  # a root's members must not resolve to it
            keep, other = other, keep
        self.parent[other] = keep
        self.fixed_reason[keep] = self.fixed_reason[keep] or self.fixed_reason[other]
        self.width_step[keep] = math.lcm(self.width_step[keep], self.width_step[other])

    def fix(self, name, reason):
        root = self.find(name)
        self.fixed_reason[root] = self.fixed_reason[root] or reason
        for member in self.members.get(root, ()):
            self.fix(member, reason)

    def keep_multiples(self, name, step):
        """Every width of the slot becomes a multiple of `step` (a grouped conv keeps whole groups)."""
        root = self.find(name)
        self.width_step[root] = math.lcm(self.width_step[root], step)
        for member in self.members.get(root, ()):
            self.keep_multiples(member, step)


class _GraphReader:
    def __init__(self, model, add_mode, multiple_of, ratios):
        self.model, self.add_mode, self.multiple_of, self.ratios = model, add_mode, multiple_of, ratios
        self.nodes = _functional_graph(model)
        self.names = [node.operation.name for node in self.nodes]
        self.nodes_by_name = {node.operation.name: node for node in self.nodes}
        self.index = {name: i for i, name in enumerate(self.names)}
        self.keras_layers = {node.operation.name: node.operation for node in self.nodes}
        self.inputs = {node.operation.name: tuple(t._keras_history[0].name for t in node.input_tensors)
                       for node in self.nodes}
        self.shapes = {node.operation.name: tuple(node.outputs[0].shape) for node in self.nodes}
        self.call_arguments = {
            node.operation.name: {k: v for k, v in node.arguments.kwargs.items() if v is not None}
            for node in self.nodes}
        self.consumers = {name: [] for name in self.names}
        for name in self.names:
            for source in self.inputs[name]:
                self.consumers[source].append(name)
        self.output = model.outputs[0]._keras_history[0].name
        self.ancestors = {}  # bit i set: layer i is an ancestor
        for name in self.names:
            bits = 0
            for source in self.inputs[name]:
                bits |= self.ancestors[source] | (1 << self.index[source])
            self.ancestors[name] = bits
        self.slots = _Slots()
        self.out_slot, self.shortcuts = {}, []

    def is_ancestor(self, ancestor, name):
        return bool(self.ancestors[name] >> self.index[ancestor] & 1)

    def channels(self, name):
        return int(self.shapes[name][-1])

    # Widths.

    def read(self):
        for name in self.names:
            layer = self.keras_layers[name]
            rule = rule_for_layer(layer)
            self.out_slot[name] = rule.read(self, layer, [self.out_slot[source] for source in self.inputs[name]])
        self.slots.fix(self.out_slot[self.output], "classifier output")
        blocks = self._identity_blocks()
        stages = self._stages(blocks)
        block_of = {layer: block.name for block in blocks.values() for layer in block.layers}
        return GraphSpace(
            name=self.model.name, input_shape=tuple(int(d) for d in self.model.inputs[0].shape[1:]),
            add_mode=self.add_mode, multiple_of=self.multiple_of,
            layers=tuple(self._graph_layer(name, block_of.get(name, "")) for name in self.names),
            slots=tuple(self._width_slot(name) for name in self.slots.parent if self.slots.find(name) == name),
            stages=stages, shortcuts=tuple(self.shortcuts), output=self.output)

    def _graph_layer(self, name, block):
        layer, rule = self.keras_layers[name], rule_for_layer(self.keras_layers[name])
        return GraphLayer(
            name=name, class_name=type(layer).__name__, kind=rule.kind, inputs=self.inputs[name],
            in_slots=tuple(self.slots.find(self.out_slot[source]) for source in self.inputs[name]),
            out_slot=self.slots.find(self.out_slot[name]),
            output_size=output_size(self.shapes[name]), block=block,
            call_arguments=self.call_arguments[name], **rule.details(layer, self.nodes_by_name[name]))

    def _width_slot(self, name):
        full, reason, step = self.slots.full_width[name], self.slots.fixed_reason[name], self.slots.width_step[name]
        members = tuple(self.slots.find(member) for member in self.slots.members.get(name, ()))
        candidates = (full,) if reason or members else candidate_widths(full, math.lcm(self.multiple_of, step),
                                                                        self.ratios)
        return WidthSlot(name, full, candidates, reason, step, members)

    def is_channel_axis(self, name, axis):
        return axis in (-1, len(self.shapes[name]) - 1)

    def read_merge(self, layer, in_slots):
        """The slot of a merge's output (`tas_keras.layer_rules.MergeRule`): the Add rule of the module
        docstring, tied or independent."""
        sources = self.inputs[layer.name]
        if len({self.channels(source) for source in sources}) > 1:
            refuse(layer, "merges inputs of different channel counts: "
                           f"{[self.channels(source) for source in sources]}")
        concatenated = any(self.slots.find(slot) in self.slots.members for slot in in_slots)
        if self._adds_tensors(layer.name) and self.add_mode == INDEPENDENT and len(sources) == 2 and (
                self.shapes[sources[0]] == self.shapes[sources[1]]) and not concatenated:
            a, b = sources
            identity = (a, b) if self.is_ancestor(a, b) else (b, a) if self.is_ancestor(b, a) else None
            if identity and self._identity_shortcut(layer, *identity):
                return self.out_slot[identity[1]]
            projections = [(p, r) for p, r in ((a, b), (b, a)) if self._projects(p, r)]
            if projections:
                p, r = projections[0]
                self.slots.tie(self.out_slot[r], self.out_slot[p])
        for slot in in_slots[1:]:
            self.slots.tie(in_slots[0], slot)
        return in_slots[0]

    def _rule(self, name):
        return rule_for_layer(self.keras_layers[name])

    def _adds_tensors(self, name):
        """Whether the layer adds tensors (an Add, `x + y`), as the end of a residual block does."""
        return self._rule(name).adds_inputs(self.keras_layers[name]) and len(self.inputs[name]) > 1

    def _walk_back(self, name, batch_norms=False):
        """Follows single-input layers that pass their input's channels through (and with `batch_norms`,
        batch normalisations) back from `name` while each output it passes has one consumer; returns the
        layers passed and the first layer that stopped the walk."""
        passed = []
        while ((self._rule(name).passes_channels_through or batch_norms and self._rule(name).batch_normalizes)
               and len(self.consumers[name]) <= 1 and len(self.inputs[name]) == 1):
            passed.append(name)
            name = self.inputs[name][0]
        return passed, name

    def _identity_shortcut(self, add, shortcut, residual):
        """Records the projection a derived network needs where x and r differ; False when r does not
        come from a conv whose settings the projection could copy (the Add is tied then)."""
        passed, conv = self._walk_back(residual, batch_norms=True)
        if not self._rule(conv).shortcut_projection_template:
            return False
        norms = [n for n in passed if self._rule(n).batch_normalizes]
        block = _block_name(add.name)
        names = (f"{block}_shortcut_conv", f"{block}_shortcut_bn")
        clash = [n for n in names if n in self.index]
        if clash:
            refuse(add, f"the projection a derived network may need would be named {clash[0]!r}, "
                         "which the model already uses")
        self.shortcuts.append(IdentityShortcut(add.name, shortcut, residual, conv, norms[-1] if norms else "",
                                               *names))
        return True

    def _projects(self, source, other):
        """Whether Add input `source` is a projection shortcut of the other input `other`."""
        if len(self.consumers[source]) != 1:
            return False
        _, conv = self._walk_back(source, batch_norms=True)
        if not self._rule(conv).shortcut_projection_template or len(self.consumers[conv]) != 1:
            return False
        _, branch = self._walk_back(self.inputs[conv][0])
        return self.is_ancestor(branch, other)

    # Depth.

    def _exit(self, add):
        """The Add's output followed through the elementwise activations that alone read it."""
        exit_, trailing = add, []
        while len(self.consumers[exit_]) == 1 and exit_ != self.output:
            consumer = self.consumers[exit_][0]
            if not self._rule(consumer).activates_elementwise(self.keras_layers[consumer]):
                break
            exit_ = consumer
            trailing.append(consumer)
        return exit_, trailing

    def _identity_blocks(self):
        """Droppable identity blocks by Add name, in graph order."""
        blocks = {}
        for name in self.names:
            sources = self.inputs[name]
            if not self._adds_tensors(name) or len(sources) != 2:
                continue
            if self.shapes[sources[0]] != self.shapes[sources[1]]:
                continue
            a, b = sources
            x, r = (a, b) if self.is_ancestor(a, b) else (b, a) if self.is_ancestor(b, a) else (None, None)
            if x is None:
                continue
            branch = [n for n in self.names if self.is_ancestor(x, n) and (n == r or self.is_ancestor(n, r))]
            inside = set(branch) | {x}
            closed = all(set(self.inputs[n]) <= inside and set(self.consumers[n]) <= inside | {name}
                         and n != self.output for n in branch)
            if closed:
                exit_, trailing = self._exit(name)
                blocks[name] = ResidualBlock(_block_name(name), x, name, exit_,
                                             tuple(branch) + (name,) + tuple(trailing))
        nested = {outer for outer, block in blocks.items()
                  if any(inner in block.layers for inner in blocks if inner != outer)}
        return self._named({name: block for name, block in blocks.items() if name not in nested})

    def _named(self, blocks):
        """The blocks, with those a keras.ops addition closes (Keras numbers it: "add_7") named after their
        layers with weights (users name those), as a stage opener is, where that name is no other block's."""
        taken, named = {block.name for block in blocks.values()}, {}
        for add, block in blocks.items():
            weighted = [n for n in block.layers if getattr(self.keras_layers[n], "weights", None)]
            if not self._rule(add).named_by_user and weighted and _common_prefix(weighted) not in taken:
                block = dataclasses.replace(block, name=_common_prefix(weighted))
                taken.add(block.name)
            named[add] = block
        return named

    def _stages(self, blocks):
        by_entry = {}
        for block in blocks.values():
            by_entry.setdefault(block.entry, []).append(block)
        follows = {block.add: by_entry[block.exit][0] for block in blocks.values()
                   if len(by_entry.get(block.exit, ())) == 1}
        has_predecessor = {b.add for b in follows.values()}
        projection_exits = {self._exit(name)[0]: name for name in self.names
                            if self._adds_tensors(name) and name not in blocks}
        stages = []
        for block in blocks.values():
            if block.add in has_predecessor:
                continue
            chain = [block]
            while chain[-1].add in follows:
                chain.append(follows[chain[-1].add])
            if block.entry in projection_exits:
                opener = _block_name(projection_exits[block.entry])
            else:
                opener = self._repeated_branch(block)
            stage = Stage(f"stage{len(stages) + 1}", opener, tuple(chain), ())
            stages.append(dataclasses.replace(stage, choices=depth_choices(stage.num_blocks)))
        return tuple(stages)

    def _repeated_branch(self, first):
        """The name of the layers just before block `first` when they repeat its residual branch (the same
        layer classes, as many of each; no-op layers such as padding and dropout aside), as a
        stage-opening block without an Add (MobileNetV2's, EfficientNet's with its squeeze-excitation
        branch); else "". They are the latest layers that the block's entry depends on, up to the
        previous merge."""
        def signature(names):
            return sorted(type(self.keras_layers[n]).__name__ for n in names
                          if not self._rule(n).is_no_op(self.keras_layers[n]))

        branch = signature(first.layers[:first.layers.index(first.add)])
        stretch = []
        for name in reversed(self.names[:self.index[first.entry] + 1]):
            if len(signature(stretch)) == len(branch):
                break
            if name != first.entry and not self.is_ancestor(name, first.entry):
                continue
            if self._rule(name).is_image_input or self._adds_tensors(name) or self._rule(name).concatenates:
                return ""  # the image, or the end of an earlier block: a gate's Multiply is part of the branch
            stretch.insert(0, name)
        if not stretch or signature(stretch) != branch:
            return ""
        # Named after its layers with weights: users name those, keras.ops operations are numbered.
        return _common_prefix([n for n in stretch if getattr(self.keras_layers[n], "weights", None)] or stretch)


def _block_name(add_name):
    return add_name[:-len("_add")] if add_name.endswith("_add") and len(add_name) > 4 else add_name


def _common_prefix(names):
    prefix = os.path.commonprefix(list(names))
    prefix = prefix[:prefix.rfind("_")] if "_" in prefix else prefix
    return prefix or names[-1]
